"""Benchmarks: peer comparison runner (``python -m benchmarks.compare``) and the Locust file."""
