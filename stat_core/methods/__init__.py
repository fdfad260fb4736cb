"""Pruning methods: STAT and its peers, one module each, listed in :mod:`stat_core.methods.registry`."""
