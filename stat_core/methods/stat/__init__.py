"""STAT: analysis, allocation, propagation and the explanations of its choices."""
