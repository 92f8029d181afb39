"""Benchmark harnesses of awm-fast (`python benchmarks/step_time.py`); helpers are the _*.py modules."""
