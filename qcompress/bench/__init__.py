"""Latency, size, parameter and MAC counts."""
