"""Experiments, the report and the command-line interface."""
