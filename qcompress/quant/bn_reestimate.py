"""Batch-norm re-estimation: recompute BN running statistics with the compressed network.

After QAT, low-bit QAT or pruning fine-tuning, the running mean/variance a BN layer holds were
accumulated (with momentum) while the weights before it were still moving, and with fake-quant
noise that differs from the final one. Folding those stale statistics into the convs shifts every
channel. Re-estimation resets each BN and feeds a few batches through the final network with only
the BN layers in train mode and ``momentum=None`` (cumulative average: every batch weighs the
same), so the statistics are those of the network as it will be folded and deployed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class BNReestimationRecord:
    layers: list[str] = field(default_factory=list)
    images: int = 0
    batches: int = 0
    # layer -> largest |change| of running_mean and running_var, to show what stale statistics cost
    mean_shift: dict[str, float] = field(default_factory=dict)
    var_shift: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, float | int]:
        """What reports show: how many layers and images, and the largest change of a statistic."""
        return {"layers": len(self.layers), "images": self.images,
                "largest_mean_shift": max(self.mean_shift.values(), default=0.0),
                "largest_var_shift": max(self.var_shift.values(), default=0.0)}


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> BNReestimationRecord:
    """Reset every BatchNorm's running statistics and re-accumulate them over ``batches`` (in place).

    Everything but the BN layers runs in eval mode (dropout off, fake-quant observers as they are);
    modes and momenta are restored afterwards. Returns which layers changed and by how much.
    Forward passes must see at least one batch, or the original statistics are put back.
    """
    bns = {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    record = BNReestimationRecord(list(bns))
    if not bns:
        return record
    modes = {name: m.training for name, m in model.named_modules()}
    saved = {name: (bn.momentum, bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
             for name, bn in bns.items() if bn.track_running_stats}
    try:
        model.eval()
        for name, bn in bns.items():
            if name in saved:
                bn.reset_running_stats()
                bn.momentum = None
                bn.train()
        for batch in batches:
            model(batch)
            record.batches += 1
            record.images += int(batch.shape[0])
    finally:
        for name, bn in bns.items():
            if name not in saved:
                continue
            momentum, mean, var, tracked = saved[name]
            bn.momentum = momentum
            if record.batches == 0:
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(tracked)
            else:
                record.mean_shift[name] = float((bn.running_mean - mean).abs().max())
                record.var_shift[name] = float((bn.running_var - var).abs().max())
        for name, module in model.named_modules():
            module.training = modes[name]  # per module: train() would recurse into children
    return record


__all__ = ["BNReestimationRecord", "reestimate_bn"]
