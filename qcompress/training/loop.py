"""The SSD training loop, shared by ``qcompress train``, pruning fine-tunes and QAT."""

from __future__ import annotations

import fnmatch
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from qcompress.data.dataset import DetectionDataset
from qcompress.errors import QCompressError
from qcompress.models.box_coder import center_to_corner, encode, match_priors
from qcompress.models.detector import Detector, preprocess_image
from qcompress.models.registry import compression_spec
from qcompress.models.ssd_lite_arch import CENTER_VARIANCE, SIZE_VARIANCE
from qcompress.training import distributed
from qcompress.training.augment import ssd_augment
from qcompress.training.distill import Distiller, NativeDistiller, imitation_mask
from qcompress.training.distributed import train_sampler
from qcompress.training.loss import multibox_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 16
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 3e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    augment: bool = True
    num_workers: int = 1
    seed: int = 0
    threads: int | None = None
    eval_every: int = 1
    eval_limit: int | None = 300
    channels_last: bool = True
    freeze_bn: bool = False  # BN layers keep their running statistics (eval mode) while the rest trains
    freeze_bn_epoch: int | None = None  # ... from this epoch on (0-based; None: as freeze_bn says)
    bf16: bool = False  # CPU autocast for the forward pass (~1.7x faster steps with AVX512-BF16); weights stay fp32
    # module-name globs kept as they are: no gradient, BN on its running statistics (e.g. the stem and the first
    # stage of a backbone trained before, as torchvision's trainable_backbone_layers and Detectron's FREEZE_AT do)
    freeze: tuple[str, ...] = ()

    def validate(self) -> TrainConfig:
        """One :class:`QCompressError` naming the first nonsense setting (before any data is read)."""
        def finite(value: float) -> bool:
            return isinstance(value, (int, float)) and math.isfinite(value)

        checks = (
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}", "e.g. --epochs 30"),
            (self.batch_size >= 1, f"--batch-size must be positive, got {self.batch_size}", "e.g. --batch-size 16"),
            (finite(self.lr) and self.lr > 0, f"--lr must be a positive number, got {self.lr}", "e.g. --lr 1e-3"),
            (finite(self.weight_decay) and self.weight_decay >= 0,
             f"--weight-decay must be >= 0, got {self.weight_decay}", "e.g. --weight-decay 5e-4 (0 turns it off)"),
            (self.optimizer in ("adamw", "sgd"), f"unknown optimizer {self.optimizer!r}", "use adamw or sgd"),
            (finite(self.momentum) and 0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}",
             "e.g. 0.9"),
            (finite(self.warmup_epochs) and self.warmup_epochs >= 0,
             f"warm-up epochs must be >= 0, got {self.warmup_epochs}", "e.g. 1"),
            (isinstance(self.seed, int) and self.seed >= 0, f"--seed must be a non-negative integer, got {self.seed}",
             "e.g. --seed 0"),
            (self.num_workers >= 0, f"--workers must be >= 0, got {self.num_workers}", "0 loads in the main process"),
            (self.threads is None or self.threads >= 1, f"--threads must be at least 1, got {self.threads}",
             "omit it to use torch's default"),
            (self.eval_every >= 1, f"eval_every must be at least 1, got {self.eval_every}", "e.g. 1"),
            (self.eval_limit is None or self.eval_limit >= 1, f"--eval-limit must be positive, got {self.eval_limit}",
             "e.g. --eval-limit 300"),
        )
        for ok, problem, hint in checks:
            if not ok:
                raise QCompressError(problem, hint)
        return self


@dataclass
class TrainResult:
    epochs_run: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


class _AugmentedSet(Dataset):
    """Non-difficult boxes of each image, SSD-augmented (seeded by seed, epoch, index) in workers."""

    fill: tuple[float, float, float] = (127.0, 127.0, 127.0)  # expand-canvas colour, pixel units

    def __init__(self, dataset: DetectionDataset, spec, augment: bool, seed: int) -> None:
        self.dataset = dataset
        self.spec = spec
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def _sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(preprocessed image, boxes ``(K, 4)`` in augmented-image pixels, labels, augmented (h, w))."""
        image = self.dataset.load_image(index)
        ann = self.dataset.annotation(index)
        keep = ~ann.difficult
        boxes, labels = ann.boxes[keep].astype(np.float32), ann.labels[keep]
        if self.augment:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            image, boxes, labels = ssd_augment(image, boxes, labels, rng, self.fill)
        x = preprocess_image(image, self.spec.input_size, self.spec.mean, self.spec.std)
        return x, torch.from_numpy(boxes).reshape(-1, 4), torch.from_numpy(labels).long(), image.shape[:2]


class SSDTrainSet(_AugmentedSet):
    """Images augmented and matched to priors in worker processes: ``(image, locations, labels)``, and
    with ``psi`` the feature-imitation mask over priors as a fourth item (see :mod:`.distill`)."""

    def __init__(self, dataset: DetectionDataset, spec, priors: torch.Tensor, augment: bool, seed: int,
                 psi: float | None = None) -> None:
        super().__init__(dataset, spec, augment, seed)
        self.fill = spec.mean
        self.priors = priors
        self.priors_corner = center_to_corner(priors)
        self.psi = psi

    def __getitem__(self, index: int):
        x, boxes, labels, (h, w) = self._sample(index)
        norm = boxes / torch.tensor([w, h, w, h], dtype=torch.float32)
        matched, target_labels = match_priors(norm, labels, self.priors_corner)
        targets = encode(matched, self.priors, CENTER_VARIANCE, SIZE_VARIANCE)
        if self.psi is None:
            return x, targets, target_labels
        return x, targets, target_labels, imitation_mask(norm, self.priors_corner, self.psi)


def ssd_priors_for(detector: Detector) -> torch.Tensor:
    """The priors a ``training="priors"`` architecture regresses against (declared on its registry entry)."""
    spec = compression_spec(detector.spec.arch)
    if spec.training != "priors" or spec.priors is None:
        raise QCompressError(f"{detector.spec.arch} declares no priors to train against",
                             "it trains with its own losses (training='native')")
    return spec.priors(detector.spec)


def trains_natively(detector: Detector) -> bool:
    """The network computes its own losses in train mode (torchvision style)."""
    return compression_spec(detector.spec.arch).training == "native"


class TorchvisionTrainSet(_AugmentedSet):
    """``(image, target)`` for torchvision detectors, which compute their own losses in train mode:
    image preprocessed to the input size, target ``{"boxes": xyxy in input pixels, "labels"}``."""

    def __getitem__(self, index: int):
        x, boxes, labels, (h, w) = self._sample(index)
        in_h, in_w = self.spec.input_size
        scale = torch.tensor([in_w / w, in_h / h, in_w / w, in_h / h], dtype=torch.float32)
        return x, {"boxes": boxes * scale, "labels": labels}


def _as_lists(batch):
    images, targets = zip(*batch)
    return list(images), list(targets)


def frozen_modules(model: nn.Module, globs: Sequence[str]) -> list[nn.Module]:
    """The modules ``--freeze`` keeps as they are: those whose name matches a glob, with everything inside them.
    A glob that matches no module is an error naming the model's top-level modules."""
    matched: dict[str, nn.Module] = {}
    for glob in globs:
        hits = {name: m for name, m in model.named_modules() if name and fnmatch.fnmatchcase(name, glob)}
        if not hits:
            names = ", ".join(name for name, _ in list(model.named_children())[:8])
            raise QCompressError(f"--freeze {glob!r} matches no module of the network",
                                 f"globs match module names, e.g. {names}")
        matched.update(hits)
    inside = {id(sub): sub for m in matched.values() for sub in m.modules()}
    return list(inside.values())


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    raise QCompressError(f"unknown optimizer {config.optimizer!r}", "use adamw or sgd")


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _torchvision_losses(net: nn.Module, images: list[torch.Tensor], targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's own training losses, summed into (box regression, everything else)."""
    losses = net(images, targets)
    regression = sum((v.float() for k, v in losses.items() if "reg" in k), torch.zeros(()))
    other = sum((v.float() for k, v in losses.items() if "reg" not in k), torch.zeros(()))
    return regression, other


StepCallback = Callable[[int, int, int, dict[str, float]], None]  # epoch, step, steps_per_epoch, losses
EpochCallback = Callable[[int, dict[str, Any]], None]


def train_detector(
    detector: Detector,
    train_set: DetectionDataset,
    config: TrainConfig,
    *,
    evaluate_fn: Callable[[Detector], dict[str, Any]] | None = None,
    checkpoint_fn: Callable[[int, dict[str, Any]], None] | None = None,
    resume_state: dict[str, Any] | None = None,
    on_step: StepCallback | None = None,
    on_epoch: EpochCallback | None = None,
    model: nn.Module | None = None,
    distiller: Distiller | NativeDistiller | None = None,
) -> TrainResult:
    """Train ``detector.model`` (or ``model``, e.g. a QAT-prepared copy) in place with the MultiBox loss.

    ``checkpoint_fn(epoch, state)`` receives optimizer/scheduler state after each epoch; passing that
    state back as ``resume_state`` continues the run exactly where it stopped.

    ``distiller`` (a :class:`~qcompress.training.distill.Distiller` around ``model``, passed as ``model``
    too) adds the teacher's imitation and output-distillation losses to the task loss.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    net = model if model is not None else detector.model
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    net.to(memory_format=memory_format)
    torchvision_model = trains_natively(detector)
    if torchvision_model:
        if distiller is not None and not isinstance(distiller, NativeDistiller):
            raise QCompressError(f"{detector.spec.arch} computes its own losses: its teacher imitates its declared "
                                 "feature levels (NativeDistiller)", "build the distiller with teacher_distiller")
        memory_format = torch.contiguous_format  # torchvision batches images itself
        net.to(memory_format=memory_format)
        data: Dataset = TorchvisionTrainSet(train_set, detector.spec, config.augment, config.seed)
    else:
        data = SSDTrainSet(train_set, detector.spec, ssd_priors_for(detector), config.augment, config.seed,
                           psi=distiller.config.psi if distiller is not None else None)
        if distiller is not None:
            distiller.teacher.to(memory_format=memory_format)
    # --freeze before DistributedDataParallel, which buckets the parameters that need gradients when it wraps
    frozen = frozen_modules(net, config.freeze)
    frozen_params = [p for m in frozen for p in m.parameters(recurse=False) if p.requires_grad]
    for param in frozen_params:
        param.requires_grad_(False)
    frozen_bn = [m for m in frozen if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    # Under torchrun the network trains in DistributedDataParallel (wrapping a wrapped one is a no-op).
    net = distributed.wrap(net)
    sampler = train_sampler(data, config.seed)  # None unless torch.distributed is initialised (torchrun)
    steps_per_epoch = max(1, (len(sampler) if sampler is not None else len(data)) // config.batch_size)
    try:
        return _train_epochs(detector, config, net, data, sampler, steps_per_epoch, torchvision_model, memory_format,
                             distiller, frozen_bn, evaluate_fn, checkpoint_fn, resume_state, on_step, on_epoch)
    finally:
        for param in frozen_params:
            param.requires_grad_(True)


def _train_epochs(detector, config, net, data, sampler, steps_per_epoch, torchvision_model, memory_format, distiller,
                  frozen_bn, evaluate_fn, checkpoint_fn, resume_state, on_step, on_epoch) -> TrainResult:
    total_steps = steps_per_epoch * config.epochs
    warmup = int(config.warmup_epochs * steps_per_epoch)
    optimizer = make_optimizer(net, config)
    start_epoch = 0
    result = TrainResult(0)
    if resume_state:
        optimizer.load_state_dict(resume_state["optimizer"])
        start_epoch = int(resume_state["epoch"]) + 1
        result.history = list(resume_state.get("history", []))
    started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        data.epoch = epoch
        # the network's own randomness (dropout, the RPN/RoI samplers) from (seed, epoch) too, so that a run
        # resumed after an epoch continues exactly as the uninterrupted run does
        torch.manual_seed(int(np.random.SeedSequence([config.seed, epoch, 7]).generate_state(1)[0]))
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader = DataLoader(
            data,
            batch_size=config.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=True,
            num_workers=config.num_workers,
            generator=torch.Generator().manual_seed(config.seed * 1000 + epoch),
            collate_fn=_as_lists if torchvision_model else None,
        )
        net.train()
        if config.freeze_bn or (config.freeze_bn_epoch is not None and epoch >= config.freeze_bn_epoch):
            for module in net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        for module in frozen_bn:
            module.eval()
        sums = {"regression": 0.0, "classification": 0.0, "imitation": 0.0, "outputs": 0.0}
        epoch_start = time.perf_counter()
        for step, batch in enumerate(loader):
            global_step = epoch * steps_per_epoch + step
            for group in optimizer.param_groups:
                group["lr"] = lr_at(global_step, total_steps, warmup, config.lr)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                if torchvision_model:
                    regression, classification = _torchvision_losses(net, *batch)
                else:
                    images, target_locations, target_labels = batch[:3]
                    confidences, locations = net(images.contiguous(memory_format=memory_format))
            if not torchvision_model:
                regression, classification = multibox_loss(
                    confidences.float(), locations.float(), target_labels, target_locations
                )
            loss = regression + classification
            if distiller is not None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                    if torchvision_model:
                        extra = distiller.losses()
                    else:
                        extra = distiller.losses(confidences.float(), locations.float(), target_labels, batch[3])
                for key, value in extra.items():
                    loss = loss + value
                    sums[key] += value.item()
            if not torch.isfinite(loss):
                raise QCompressError(f"training diverged at epoch {epoch + 1} step {step + 1}", "lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
            optimizer.step()
            sums["regression"] += regression.item()
            sums["classification"] += classification.item()
            if on_step:
                on_step(epoch, step, steps_per_epoch, {"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]})
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "regression_loss": sums["regression"] / steps_per_epoch,
            "classification_loss": sums["classification"] / steps_per_epoch,
            **({"imitation_loss": sums["imitation"] / steps_per_epoch,
                "output_distill_loss": sums["outputs"] / steps_per_epoch} if distiller is not None else {}),
            "seconds": time.perf_counter() - epoch_start,
        }
        net.eval()
        due = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
        if evaluate_fn and due and distributed.is_main_process():
            record.update(evaluate_fn(detector))
        result.history.append(record)
        result.epochs_run = epoch + 1
        if checkpoint_fn and distributed.is_main_process():
            checkpoint_fn(epoch, {"optimizer": optimizer.state_dict(), "epoch": epoch, "history": result.history})
        if on_epoch:
            on_epoch(epoch, record)
    net.to(memory_format=torch.contiguous_format)
    result.seconds = time.perf_counter() - started
    return result
