"""Benchmarks and the GPU check: run through jobs/bench_*.py and jobs/gpu_check.py, not part of hcd."""
