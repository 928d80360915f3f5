"""Imports every command module so they register on the app."""

from qcompress.cli import bench_cmd, quantize_cmd, train_cmd  # noqa: F401
