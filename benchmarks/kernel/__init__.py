"""The parts of ``benchmarks/kernel_path.py``: the synthetic pod, the load generator, the
configurations, the trials, the install cost, the report."""
