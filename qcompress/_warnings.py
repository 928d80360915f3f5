"""Silence torch.ao eager-quantization deprecation noise inside our own code paths.

torch 2.14 warns on every eager-mode quantization call (the API moves to torchao). The warnings
say nothing a qcompress user can act on, so our code paths filter exactly those messages.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

_MESSAGES = (
    r"torch\.ao\.quantization is deprecated",
    r"Please use quant_min and quant_max",
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
    r".*quantized tensor creation functions.*",
    r".*TypedStorage is deprecated.*",
    r".*must run observer before calling calculate_qparams.*",
)


def install_filters() -> None:
    """Install the filters process-wide (used by the CLI entry point)."""
    for message in _MESSAGES:
        warnings.filterwarnings("ignore", message=message)


@contextlib.contextmanager
def quiet_torch_ao() -> Iterator[None]:
    with warnings.catch_warnings():
        install_filters()
        yield
