"""Evaluation: the token-weighted loss loop, model scoring, comparison, plots."""
