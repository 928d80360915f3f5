"""Process-global torch settings (thread count, quantized engine) set for one job and restored after it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from qcompress.torch_state import torch_state

F = TypeVar("F", bound=Callable[..., Any])


def restores_torch_state(job: F) -> F:
    """Decorate a job so the thread count and quantized engine are the caller's again when it returns."""

    @functools.wraps(job)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch_state():
            return job(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
