"""The parts of ``benchmarks/load.py``: admissions, checks, the authz server killed under load,
the report."""
