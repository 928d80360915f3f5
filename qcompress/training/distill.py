"""The float parent as teacher: fine-grained feature imitation and output distillation.

Feature imitation follows Wang et al., "Distilling Object Detectors with Fine-grained Feature
Imitation" (CVPR 2019): the student imitates the teacher's feature map only at the locations near
objects. For each ground-truth box, the IoU with every prior is computed and the locations owning
a prior with IoU >= ``psi`` x (that box's best IoU) are kept (the IoU-ratio mask, psi = 0.5 in the
paper). A 1x1 adaptation conv per feature level maps the student's channels to the teacher's (the
two differ after channel pruning); the loss is the paper's: the squared difference at the masked
locations summed over channels, divided by twice the number of masked locations ``N_p``
(``sum I (f_adap(s) - t)^2 / 2 N_p``), weighted by lambda = 0.01 (the weight of the paper's code). An
earlier version averaged over channels with lambda 1, which weighs a C-channel level C / 2 x 0.01 times
less: 2.9x and 6.4x less on the embedded default's two finest levels (576 and 1280 channels, 19x19 and
10x10 locations, where most masked locations are), 0.3x on its coarsest (64).

Output distillation (optional): KL divergence of the class distributions at every prior
(temperature T, scaled by T^2) plus smooth L1 between the student's and the teacher's box offsets
at the priors matched to objects.

Which features: an architecture trained against priors declares ``CompressionSpec.feature_taps``, one
classification-head module per level in prior order; the feature imitated is that module's input, and
its output channels / classes give the priors per location (SSD heads: priors ordered level, row,
column, prior). A detector that computes its own losses (torchvision style) declares
``CompressionSpec.native_taps``: its input transform, the module whose output is the feature levels
(e.g. the FPN's) and its anchor generator (:class:`NativeDistiller`); the mask comes from those anchors
and the transformed targets, as the paper's from its RPN anchors. An anchor-free one (CenterNet) declares
no anchor module: the feature is then the *input* of its features module (the heads' shared input), and the
mask holds the locations whose cell centre lies inside a ground-truth box (``psi`` does not apply).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qcompress.errors import QCompressError
from qcompress.models.box_coder import box_iou


@dataclass(frozen=True)
class DistillConfig:
    imitation: float = 0.01  # lambda of the feature-imitation loss (0: off); the paper's code's 0.01
    psi: float = 0.5  # IoU ratio of the imitation mask
    outputs: float = 0.0  # lambda of output distillation (class KL + box offsets; 0: off)
    temperature: float = 2.0

    def validate(self) -> DistillConfig:
        for flag, value in (("--imitation", self.imitation), ("--distill-outputs", self.outputs)):
            if not (value >= 0 and value < float("inf")):
                raise QCompressError(f"{flag} must be a finite weight >= 0, got {value}", "e.g. 0.01 (0 turns it off)")
        if not 0 < self.psi <= 1:
            raise QCompressError(f"--psi must be in (0, 1], got {self.psi}", "0.5 as in the paper")
        if not self.temperature > 0:
            raise QCompressError(f"--temperature must be positive, got {self.temperature}", "e.g. 2")
        if self.imitation == 0 and self.outputs == 0:
            raise QCompressError("--teacher with --imitation 0 and --distill-outputs 0 distils nothing",
                                 "give one of them a positive weight, or drop --teacher")
        return self


def imitation_mask(gt_boxes: torch.Tensor, priors_corner: torch.Tensor, psi: float) -> torch.Tensor:
    """``(P,)`` bool: priors whose IoU with some ground truth reaches ``psi`` x that box's best IoU.

    ``gt_boxes`` ``(G, 4)`` and ``priors_corner`` ``(P, 4)`` are corner form in the same units.
    """
    if gt_boxes.numel() == 0:
        return torch.zeros(priors_corner.shape[0], dtype=torch.bool)
    ious = box_iou(gt_boxes, priors_corner)  # (G, P)
    best = ious.max(dim=1, keepdim=True).values
    return ((ious >= psi * best) & (best > 0)).any(dim=0)


def level_masks(prior_mask: torch.Tensor, shapes: Sequence[tuple[int, int, int]]) -> list[torch.Tensor]:
    """Split ``(N, P)`` prior masks into per-level location masks ``(N, H, W)``; ``shapes`` are the
    levels' ``(H, W, priors per location)`` in prior order (level, row, column, prior)."""
    counts = [h * w * a for h, w, a in shapes]
    if sum(counts) != prior_mask.shape[1]:
        raise QCompressError(f"the feature taps hold {sum(counts)} priors, the targets {prior_mask.shape[1]}",
                             "the architecture's feature_taps must be its classification heads, in prior order")
    out = []
    for chunk, (h, w, a) in zip(prior_mask.split(counts, dim=1), shapes):
        out.append(chunk.reshape(-1, h, w, a).any(dim=3))
    return out


def imitation_loss(adapters: Sequence[nn.Module], student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                   masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Wang et al.'s loss (unweighted): ``sum over masked locations and channels of (adapter(s) - t)^2 / 2 N_p``
    over the feature levels (``(N, C, H, W)`` features, ``(N, H, W)`` bool masks)."""
    total, points = student[0].new_zeros((), dtype=torch.float32), 0
    for adapter, s, t, m in zip(adapters, student, teacher, masks):
        if not m.any():
            continue
        diff = (adapter(s.float()) - t.float()).pow(2).sum(dim=1)  # (N, H, W), summed over channels
        total = total + diff[m].sum()
        points += int(m.sum())
    return total / (2 * max(points, 1))


def fit_adapter(adapter: nn.Conv2d, student: torch.Tensor, teacher: torch.Tensor, ridge: float = 0.1) -> None:
    """Set the 1x1 conv ``adapter`` to the least-squares map from ``student`` to ``teacher`` features
    (``(N, S, H, W)``, ``(N, T, H, W)``, every position a sample; ridge ``ridge`` x the mean feature energy)."""
    x = student.detach().double().permute(0, 2, 3, 1).reshape(-1, student.shape[1])
    y = teacher.detach().double().permute(0, 2, 3, 1).reshape(-1, teacher.shape[1])
    x_mean, y_mean = x.mean(dim=0), y.mean(dim=0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc
    gram += torch.eye(gram.shape[0], dtype=gram.dtype) * (ridge * float(gram.diagonal().mean()) + 1e-12)
    weight = torch.linalg.solve(gram, xc.T @ yc)  # (S, T)
    with torch.no_grad():
        adapter.weight.copy_(weight.T.reshape(adapter.weight.shape).to(adapter.weight.dtype))
        adapter.bias.copy_((y_mean - x_mean @ weight).to(adapter.bias.dtype))


def _adapters(student_channels: Sequence[int], teacher_channels: Sequence[int]) -> nn.ModuleList:
    """1x1 adaptation convs student -> teacher channels: the identity where the widths agree; elsewhere (a
    pruned student) torch's default init until :func:`fit_pending` fits them on the first training batch."""
    adapters = nn.ModuleList(nn.Conv2d(s, t, 1) for s, t in zip(student_channels, teacher_channels))
    for adapter, s, t in zip(adapters, student_channels, teacher_channels):
        if s == t:
            nn.init.zeros_(adapter.bias)
            with torch.no_grad():
                adapter.weight.copy_(torch.eye(t).reshape(t, t, 1, 1))
    return adapters


def fit_pending(adapters: nn.ModuleList, pending: list[int], student: Sequence[torch.Tensor],
                teacher: Sequence[torch.Tensor]) -> list[int]:
    """Fit the ``pending`` adapters (levels where the student is narrower) to the features the first training
    batch produced, in the mode training runs in (a freshly pruned network's BN running statistics are
    stale: features taken in eval mode fit adapters that do worse than random ones in training). Under
    torchrun rank 0's fit is broadcast. Returns the empty list of levels still to fit."""
    if not pending:
        return pending
    with torch.no_grad():
        for i in pending:
            fit_adapter(adapters[i], student[i], teacher[i])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for i in pending:
                for p in adapters[i].parameters():
                    torch.distributed.broadcast(p.data, src=0)
    return []


class _Taps:
    """Forward hooks that keep each tap's input (the feature) and output shape (priors per location)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.features: list[torch.Tensor | None] = [None] * len(names)
        self.out_channels: list[int] = [0] * len(names)
        self.handles = []
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise QCompressError(f"feature tap {missing[0]!r} is not a module of this network",
                                 "the architecture declares taps its network does not have")
        for i, name in enumerate(names):
            self.handles.append(modules[name].register_forward_hook(self._hook(i)))

    def _hook(self, i: int):
        def keep(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self.features[i] = inputs[0]
            self.out_channels[i] = int(output.shape[1])
        return keep

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _probe_taps(student: nn.Module, probe: nn.Module | None, teacher: nn.Module, student_taps: _Taps,
                teacher_taps: _Taps, names: Sequence[str], example: torch.Tensor) -> tuple[list, list]:
    """The tapped features of one ``example`` through the probe (eval mode) and the teacher; the taps are emptied
    after. ``probe``: a float network with the student's structure, to read the student's widths without running
    the student (an int8 QAT student would let its observers see the probe image); None: the student itself."""
    probe = student if probe is None else probe
    probe_taps = _Taps(probe, names) if probe is not student else student_taps
    with torch.no_grad():
        was = probe.training
        probe.eval()
        probe(example)
        probe.train(was)
        teacher(example)
    s_feats, t_feats = list(probe_taps.features), list(teacher_taps.features)
    if probe_taps is not student_taps:
        probe_taps.remove()
    student_taps.features = [None] * len(names)
    teacher_taps.features = [None] * len(names)
    return s_feats, t_feats


class _Distiller(nn.Module):
    """What both distillers hold: the student, the frozen teacher (outside the module tree: not trained, saved
    or synchronised), the config, and the adapters with the levels still to fit on the first batch."""

    def __init__(self, student: nn.Module, teacher: nn.Module, config: DistillConfig) -> None:
        super().__init__()
        self.student = student
        self._teacher = [teacher.eval()]
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.config = config

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def _set_adapters(self, student_channels: Sequence[int], teacher_channels: Sequence[int]) -> None:
        self.adapters = _adapters(student_channels, teacher_channels)
        # Narrower (pruned) levels: least-squares adapters, fitted on the first training batch (fit_pending). A
        # resumed run loads its trained adapters and clears this.
        self.pending_fit = [i for i, (s, t) in enumerate(zip(student_channels, teacher_channels)) if s != t]


class Distiller(_Distiller):
    """The student and its adaptation layers in one module (so DDP keeps both in sync).

    ``forward`` is the student's; :meth:`losses` then runs the teacher on the same images (no grad)
    and returns the imitation and output-distillation terms. The teacher is held outside the module
    tree: it is not trained, saved or synchronised.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, taps: Sequence[str], num_classes: int,
                 config: DistillConfig, example: torch.Tensor, probe: nn.Module | None = None) -> None:
        if not taps:
            raise QCompressError("this architecture declares no feature taps to imitate",
                                 "--teacher works with architectures trained against priors (SSD-style heads)")
        super().__init__(student, teacher, config)
        self.num_classes = num_classes
        self.student_taps = _Taps(student, taps)
        self.teacher_taps = _Taps(teacher, taps)
        self._images: torch.Tensor | None = None
        s_feats, t_feats = _probe_taps(student, probe, teacher, self.student_taps, self.teacher_taps, taps, example)
        self._set_adapters([f.shape[1] for f in s_feats], [f.shape[1] for f in t_feats])

    def forward(self, images: torch.Tensor):
        self._images = images
        return self.student(images)

    def level_shapes(self) -> list[tuple[int, int, int]]:
        shapes = []
        for feature, channels in zip(self.student_taps.features, self.student_taps.out_channels):
            if channels % self.num_classes:
                raise QCompressError(f"a feature tap outputs {channels} channels, not a multiple of "
                                     f"{self.num_classes} classes", "feature_taps must be classification heads")
            shapes.append((int(feature.shape[2]), int(feature.shape[3]), channels // self.num_classes))
        return shapes

    def losses(self, confidences: torch.Tensor, locations: torch.Tensor, target_labels: torch.Tensor,
               prior_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"imitation", "outputs"}`` (weighted) for the batch the last forward saw."""
        with torch.no_grad():
            t_conf, t_loc = self.teacher(self._images)
        zero = confidences.new_zeros(())
        imitation = outputs = zero
        if self.config.imitation > 0:
            self.pending_fit = fit_pending(self.adapters, self.pending_fit, self.student_taps.features,
                                           self.teacher_taps.features)
            masks = level_masks(prior_mask, self.level_shapes())
            imitation = self.config.imitation * imitation_loss(self.adapters, self.student_taps.features,
                                                               self.teacher_taps.features, masks)
        if self.config.outputs > 0:
            temp = self.config.temperature
            kl = F.kl_div(F.log_softmax(confidences / temp, dim=2), F.log_softmax(t_conf.float() / temp, dim=2),
                          log_target=True, reduction="none").sum(dim=2).mean() * temp * temp
            positive = target_labels > 0
            box = F.smooth_l1_loss(locations[positive], t_loc.float()[positive], reduction="sum") / positive.sum().clamp(min=1)
            outputs = self.config.outputs * (kl + box)
        return {"imitation": imitation, "outputs": outputs}

    def detach_hooks(self) -> None:
        self.student_taps.remove()
        self.teacher_taps.remove()


def _levels(output) -> list[torch.Tensor]:
    """A feature module's output as a list of ``(N, C, H, W)`` levels (a tensor, a list or a dict)."""
    if isinstance(output, torch.Tensor):
        return [output]
    return list(output.values()) if isinstance(output, dict) else list(output)


class NativeDistiller(_Distiller):
    """Feature imitation for a detector that computes its own losses: ``model(images, targets)`` in train
    mode (torchvision's FCOS, RetinaNet; Faster R-CNN VGG16). ``taps`` = ``(transform, features, anchors)``
    module names; ``transform`` is ``""`` for a model that takes the batch and its targets as they are.

    Forward hooks keep what the student's own forward computed: the transformed batch and targets (the
    transform's output, else the forward's arguments), the feature levels and the anchors (per image, or
    one tensor shared by every image; level by level, location-major, as torchvision's ``AnchorGenerator``
    orders them). :meth:`losses` runs the teacher's feature module on the same batch and returns the
    imitation term with the IoU-ratio mask over those anchors. Output distillation is for prior-based
    heads only.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, taps: Sequence[str], config: DistillConfig,
                 example: torch.Tensor, probe: nn.Module | None = None) -> None:
        if len(taps) != 3:
            raise QCompressError("this architecture declares no (transform, features, anchors) modules to imitate",
                                 "drop --teacher for this model")
        if config.outputs > 0:
            raise QCompressError("--distill-outputs is for detectors trained against priors (SSD-style heads)",
                                 "use --imitation alone for this model")
        super().__init__(student, teacher, config)
        self.names = tuple(taps)
        modules = dict(student.named_modules())
        missing = [n for n in self.names if n and n not in modules]
        if missing or not self.names[1]:
            raise QCompressError(f"feature tap {missing[0] if missing else ''!r} is not a module of this network",
                                 "the architecture declares taps its network does not have")
        transform, features, anchors = self.names
        self.anchor_free = not anchors
        self._seen: dict[str, object] = {}
        self.handles = []
        if self.anchor_free:  # the input of the features module, from the student's and the teacher's forwards
            self.student_taps, self.teacher_taps = _Taps(student, [features]), _Taps(teacher, [features])
        else:
            self.handles += [
                modules[features].register_forward_hook(lambda m, i, o: self._seen.update(features=_levels(o))),
                modules[anchors].register_forward_hook(lambda m, i, o: self._seen.update(anchors=o)),
            ]
        if transform:
            self.handles.append(modules[transform].register_forward_hook(
                lambda m, i, o: self._seen.update(images=o[0].tensors, targets=o[1])))
        if self.anchor_free:
            s_feats, t_feats = _probe_taps(student, probe, teacher, self.student_taps, self.teacher_taps, [features],
                                           example)
        else:
            probe = student if probe is None else probe
            with torch.no_grad():
                was = probe.training
                probe.eval()
                s_feats = _levels(probe.get_submodule(features)(example))
                probe.train(was)
                t_feats = _levels(teacher.get_submodule(features)(example))
        if len(s_feats) != len(t_feats):
            raise QCompressError(f"the student has {len(s_feats)} feature levels, the teacher {len(t_feats)}",
                                 "pass a teacher of the same architecture")
        self._set_adapters([f.shape[1] for f in s_feats], [f.shape[1] for f in t_feats])

    def forward(self, images, targets=None):
        self._seen.clear()
        if not self.names[0]:  # no transform: the network sees the batch and targets as given
            batch = torch.stack(list(images)) if isinstance(images, (list, tuple)) else images
            self._seen.update(images=batch, targets=targets)
        output = self.student(images, targets)
        if self.anchor_free:  # the features module's input, kept by the student's taps
            self._seen["features"] = list(self.student_taps.features)
        return output

    def masks(self) -> list[torch.Tensor]:
        """Per-level ``(N, H, W)`` location masks of the last forward's targets over its anchors (anchor-free:
        the locations inside the boxes)."""
        feats, targets = self._seen["features"], self._seen["targets"]
        if self.anchor_free:
            height, width = (int(v) for v in self._seen["images"].shape[-2:])
            return [inside_boxes_mask([t["boxes"] for t in targets], f.shape[-2:], (height, width)) for f in feats]
        anchors = self._seen["anchors"]
        if isinstance(anchors, torch.Tensor):  # one set for the whole batch
            anchors = [anchors] * len(targets)
        cells = sum(int(f.shape[2] * f.shape[3]) for f in feats)
        per_location, rest = divmod(int(anchors[0].shape[0]), cells)
        if rest or not per_location:
            raise QCompressError(f"{anchors[0].shape[0]} anchors do not tile {cells} feature locations",
                                 "the declared anchor module must generate the anchors of the declared features")
        prior_mask = torch.stack([imitation_mask(t["boxes"].float(), a.float(), self.config.psi)
                                  for t, a in zip(targets, anchors)])
        return level_masks(prior_mask, [(int(f.shape[2]), int(f.shape[3]), per_location) for f in feats])

    def losses(self) -> dict[str, torch.Tensor]:
        """``{"imitation", "outputs"}`` (weighted; outputs 0) for the batch the last forward saw."""
        feats = self._seen.get("features")
        if feats is None or "targets" not in self._seen or self._seen["targets"] is None:
            raise QCompressError("the teacher saw no training forward pass", "call the distiller with targets first")
        with torch.no_grad():
            if self.anchor_free:
                self.teacher(self._seen["images"])
                teacher_feats = list(self.teacher_taps.features)
            else:
                teacher_feats = _levels(self.teacher.get_submodule(self.names[1])(self._seen["images"]))
        self.pending_fit = fit_pending(self.adapters, self.pending_fit, feats, teacher_feats)
        loss = imitation_loss(self.adapters, feats, teacher_feats, self.masks())
        return {"imitation": self.config.imitation * loss, "outputs": loss.new_zeros(())}

    def detach_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        if self.anchor_free:
            self.student_taps.remove()
            self.teacher_taps.remove()


def inside_boxes_mask(boxes: Sequence[torch.Tensor], shape: Sequence[int], image_size: tuple[int, int]) -> torch.Tensor:
    """``(N, H, W)`` bool: the locations of an ``H x W`` feature map over an ``image_size`` batch whose cell
    centre lies inside one of the image's ``(G, 4)`` xyxy boxes (input pixels): an anchor-free detector's
    near-object locations (FCOS's positive locations), its form of the imitation mask."""
    height, width = int(shape[0]), int(shape[1])
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) * (image_size[0] / height)
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) * (image_size[1] / width)
    masks = []
    for image_boxes in boxes:
        b = image_boxes.float().reshape(-1, 4)
        inside_x = (xs[None, :] >= b[:, 0:1]) & (xs[None, :] <= b[:, 2:3])  # (G, W)
        inside_y = (ys[None, :] >= b[:, 1:2]) & (ys[None, :] <= b[:, 3:4])  # (G, H)
        masks.append((inside_y[:, :, None] & inside_x[:, None, :]).any(dim=0))
    return torch.stack(masks) if masks else torch.zeros(0, height, width, dtype=torch.bool)


__all__ = ["DistillConfig", "Distiller", "NativeDistiller", "fit_adapter", "fit_pending", "imitation_loss", "imitation_mask",
           "inside_boxes_mask", "level_masks"]
