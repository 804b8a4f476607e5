"""Pieces of ``python -m benchmarks``: running the scripts, extra measurements, plots, report."""
