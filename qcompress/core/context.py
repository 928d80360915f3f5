"""Process-global torch settings (thread count, quantized engine) set for one job and restored after it."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def torch_state(threads: int | None = None, engine: str | None = None) -> Iterator[None]:
    """Run a block with ``threads`` / quantized ``engine`` (None: unchanged) and restore both afterwards,
    also when the block itself changes them (calibration and conversion select their engine)."""
    previous_threads, previous_engine = torch.get_num_threads(), torch.backends.quantized.engine
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        if engine is not None:
            torch.backends.quantized.engine = engine
        yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.backends.quantized.engine = previous_engine


def restores_torch_state(job: F) -> F:
    """Decorate a job so the thread count and quantized engine are the caller's again when it returns."""

    @functools.wraps(job)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch_state():
            return job(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
