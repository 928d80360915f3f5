"""Imports every command module so they register on the app."""

from qcompress.cli import bench_cmd, quantize_cmd, train_cmd  # noqa: F401
from qcompress.cli import prune_cmd  # noqa: F401
from qcompress.cli import qat_cmd  # noqa: F401
