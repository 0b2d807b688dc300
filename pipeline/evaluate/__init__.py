"""Evaluation: reward scorers on actor pools, base-vs-aligned comparison with bootstrap intervals, the report."""
