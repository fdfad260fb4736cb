"""Measures: perplexity, the evaluation suite, before/after comparisons, reports."""
