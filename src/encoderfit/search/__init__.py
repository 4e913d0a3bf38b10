"""Sweeps: the search space, the study and its pruner."""
