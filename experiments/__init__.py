"""Experiments (exp_*.py), their runner (cached, resumable), plots and the report."""
