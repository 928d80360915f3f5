"""The one context for torch's process-global settings: set for a block, restored after it."""

from __future__ import annotations

import pytest
import torch

from qcompress.torch_state import torch_state


def test_threads_and_engine_are_restored_even_when_the_block_changes_them():
    threads, engine = torch.get_num_threads(), torch.backends.quantized.engine
    other = next((e for e in torch.backends.quantized.supported_engines if e not in (engine, "none")), None)
    with torch_state(threads=1, engine=other) as used:
        assert used == 1 == torch.get_num_threads()
        assert torch.backends.quantized.engine == (other or engine)
        torch.set_num_threads(2)  # e.g. a job's own --threads
        torch.backends.quantized.engine = engine if other else torch.backends.quantized.engine
    assert (torch.get_num_threads(), torch.backends.quantized.engine) == (threads, engine)


def test_restored_after_an_exception():
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError), torch_state(threads=1):
        raise RuntimeError("interrupted")
    assert torch.get_num_threads() == threads


def test_the_binary_engine_runs_on_as_many_threads_as_torch():
    """A timing at --threads 1 must not give the numba kernels of the binary engine both cores."""
    import numba

    import qcompress.runtime.binary  # noqa: F401  (the engine loaded: its kernels run on numba's threads)

    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    before = numba.get_num_threads()
    with torch_state(threads=1):
        assert numba.get_num_threads() == 1
    assert numba.get_num_threads() == before
