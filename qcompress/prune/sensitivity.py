"""Per-layer pruning sensitivity: prune one target alone at several amounts and score the result.

The table (target x amount -> score drop) is what a user reads to choose per-layer amounts; the
suggestion (largest amount whose drop stays within a tolerance) is written as a JSON file that
``qcompress prune --amounts-file`` accepts directly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

PruneOne = Callable[[nn.Module, str, float], None]  # (model copy, target name, amount) -> prunes in place
Score = Callable[[nn.Module], float]  # higher is better (e.g. mAP)


@dataclass
class SensitivityResult:
    baseline: float
    amounts: tuple[float, ...]
    scores: dict[str, dict[float, float]] = field(default_factory=dict)  # target -> amount -> score

    def drops(self) -> dict[str, dict[float, float]]:
        return {t: {a: self.baseline - s for a, s in row.items()} for t, row in self.scores.items()}

    def suggest(self, max_drop: float) -> dict[str, float]:
        """Per target, the largest tested amount whose score drop is at most ``max_drop`` (0.0 if none)."""
        suggestion = {}
        for target, row in self.drops().items():
            ok = [a for a, d in row.items() if d <= max_drop]
            suggestion[target] = max(ok) if ok else 0.0
        return suggestion

    def rows(self) -> list[list]:
        """``[target, drop at each amount...]``, most sensitive first (largest drop at the largest amount)."""
        drops = self.drops()
        ordered = sorted(drops, key=lambda t: -max(drops[t].values(), default=0.0))
        return [[t, *[drops[t][a] for a in self.amounts]] for t in ordered]


def sensitivity_scan(
    model: nn.Module,
    targets: Sequence[str],
    amounts: Sequence[float],
    prune_one: PruneOne,
    score: Score,
    on_trial: Callable[[str, float, float], None] | None = None,
) -> SensitivityResult:
    """Score ``model`` unpruned, then each target pruned alone at each amount (on a fresh copy each time)."""
    result = SensitivityResult(baseline=score(model), amounts=tuple(amounts))
    for target in targets:
        row = {}
        for amount in amounts:
            trial = copy.deepcopy(model)
            prune_one(trial, target, amount)
            row[amount] = score(trial)
            if on_trial:
                on_trial(target, amount, row[amount])
        result.scores[target] = row
    return result


__all__ = ["SensitivityResult", "sensitivity_scan"]
