"""Process-global torch settings (intra-op thread count, quantized engine) set for a block and restored
after it: the one context every job, measurement and export uses."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def _numba():
    """numba when the binary engine is loaded (its kernels run on numba's threads), else None."""
    if "qcompress.runtime.binary" not in sys.modules:
        return None
    import numba

    return numba


@contextmanager
def torch_state(threads: int | None = None, engine: str | None = None) -> Iterator[int]:
    """Run a block with ``threads`` intra-op threads (the binary engine's numba threads too, once it is
    loaded) and quantized ``engine`` (falsy: unchanged); both are restored afterwards, also when the block itself changes them (calibration and conversion select
    their engine). Yields the thread count in effect."""
    previous_threads, previous_engine = torch.get_num_threads(), torch.backends.quantized.engine
    numba = _numba() if threads else None  # the binary engine gets the same thread count as torch
    previous_numba = numba.get_num_threads() if numba else None
    try:
        if threads:
            torch.set_num_threads(threads)
            if numba:
                numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        if engine and engine != previous_engine:
            torch.backends.quantized.engine = engine
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
        torch.backends.quantized.engine = previous_engine
        if numba:
            numba.set_num_threads(previous_numba)
