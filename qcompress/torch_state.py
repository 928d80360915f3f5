"""Process-global torch settings (intra-op thread count, quantized engine) set for a block and restored
after it: the one context every job, measurement and export uses."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_state(threads: int | None = None, engine: str | None = None) -> Iterator[int]:
    """Run a block with ``threads`` intra-op threads and quantized ``engine`` (falsy: unchanged); both are
    restored afterwards, also when the block itself changes them (calibration and conversion select
    their engine). Yields the thread count in effect."""
    previous_threads, previous_engine = torch.get_num_threads(), torch.backends.quantized.engine
    try:
        if threads:
            torch.set_num_threads(threads)
        if engine and engine != previous_engine:
            torch.backends.quantized.engine = engine
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
        torch.backends.quantized.engine = previous_engine
