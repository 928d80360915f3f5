"""The ``qcompress`` command line: thin Typer commands over the library in :mod:`qcompress.api`."""

from __future__ import annotations

from qcompress.cli.app import app, main

__all__ = ["app", "main"]
