"""Data-parallel training over several processes (DistributedDataParallel), for users who outgrow
one machine's patience.

Entry point: the ordinary CLI started by ``torchrun``, which sets ``RANK``/``WORLD_SIZE``/``MASTER_*``
for every process::

    torchrun --standalone --nproc_per_node 4 -m qcompress qat --model-path M --epochs 2
    # multi-node: torchrun --nnodes 2 --node_rank R --rdzv_endpoint HOST:PORT --nproc_per_node 4 -m qcompress qat ...

Every job that trains (``train``, ``qat``, ``prune --finetune-epochs``) enters :func:`session`, which calls :func:`init_from_env`: without torchrun's
variables (or with ``WORLD_SIZE=1``) it returns None and everything runs single-process as before.
With them, every process builds the same model from the same seed, the training loop gives each
rank its own shard of every epoch (:func:`train_sampler`) and DDP averages gradients; rank 0 alone
writes checkpoints, evaluates and reports. The training loop runs on CPU, so the process group is
gloo.

``--batch-size`` stays per process: the global batch is ``K x batch size``.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from qcompress.errors import QCompressError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_env(backend: str = "gloo", timeout_s: float = 1800.0) -> DistContext | None:
    """Join the process group torchrun described in the environment; None when not under torchrun."""
    if env_world_size() <= 1:
        return None
    if not dist.is_available():
        raise QCompressError("this torch build has no torch.distributed", "run without torchrun")
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise QCompressError(f"WORLD_SIZE is set but {', '.join(missing)} is not", "start the command with torchrun")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_backend())


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0, and always outside torchrun (env RANK is enough: usable before init)."""
    if is_distributed():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def train_sampler(dataset: Dataset, seed: int) -> DistributedSampler | None:
    """This rank's shard of the training set (shuffled per epoch via set_epoch); None single-process."""
    if not is_distributed():
        return None
    return DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed, drop_last=True)


def wrap(model: nn.Module) -> nn.Module:
    """``model`` in DistributedDataParallel when a process group is up, else unchanged.

    Call after every data-dependent initialisation (observers, low-bit quantizer steps): DDP
    broadcasts rank 0's parameters and buffers when it wraps.
    """
    if not is_distributed() or isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    return nn.parallel.DistributedDataParallel(model)


@contextmanager
def session() -> Iterator[bool]:
    """torchrun's process group for one job (nothing without torchrun's variables); yields whether this
    process is rank 0, the one that writes checkpoints and reports. Every training job enters it."""
    context = init_from_env()
    try:
        yield is_main_process()
    finally:
        if context is not None:
            shutdown()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@torch.no_grad()
def max_parameter_divergence(model: nn.Module) -> float:
    """Largest |p_rank - p_rank0| over all parameters and ranks (0.0 when replicas are in sync)."""
    if not is_distributed():
        return 0.0
    worst = torch.zeros(())
    for p in unwrap(model).parameters():
        reference = p.detach().clone()
        dist.broadcast(reference, src=0)
        worst = torch.maximum(worst, (p.detach() - reference).abs().max())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "DistContext",
    "barrier",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "max_parameter_divergence",
    "rank",
    "shutdown",
    "train_sampler",
    "unwrap",
    "world_size",
    "wrap",
]
