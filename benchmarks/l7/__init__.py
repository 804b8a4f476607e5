"""The parts of ``benchmarks/l7_path.py``: its Envoys and servers, the measurement, the report."""
