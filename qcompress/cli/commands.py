"""Imports every command module so they register on the app."""

from qcompress.cli import train_cmd  # noqa: F401
