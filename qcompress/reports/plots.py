"""The report page's charts, drawn with matplotlib into PNG bytes.

Readable in greyscale print: points differ by marker shape and fill, lines by dash pattern, bars by
hatching, and the few colours come from ``cividis`` (luminance rises monotonically along it). Every
axis names its quantity and unit. Figures are built with :class:`matplotlib.figure.Figure` directly,
not ``pyplot``, so nothing global is touched and no display is needed. matplotlib is imported only
when a chart is drawn: :func:`available` tells the page whether to fall back to tables.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qcompress.reports.zoo import pareto_front

DPI = 90
# Marker per command: shapes stay distinguishable without colour.
MARKERS = {"quantize": "s", "prune": "^", "qat": "D", "bench": "o", "compare": "v", "eval": "P", "export": "X"}
PARENT_MARKER = "*"
HATCHES = ("", "//", "..", "xx", "\\\\", "oo", "--", "++")
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))


def available() -> str | None:
    """None when charts can be drawn, else why not (matplotlib missing or broken)."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except (ImportError, OSError, RuntimeError) as exc:  # missing, or a broken install failing on import
        return f"matplotlib could not be imported ({exc.__class__.__name__}: {exc})"
    return None


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    return figure


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    # No "Software" metadata: the same reports give byte-identical pictures with any matplotlib build.
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _shades(count: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["cividis"]
    return [cmap(0.15 + 0.7 * i / max(1, count - 1)) for i in range(count)]


def _short(text: str, limit: int = 26) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------- trade-off
@dataclass
class Point:
    x: float
    y: float
    label: str
    command: str
    parent: bool = False


@dataclass
class Panel:
    x_label: str
    points: list[Point]
    log_x: bool = False


def tradeoff_chart(panels: Sequence[Panel], y_label: str, title: str) -> bytes:
    """Accuracy (y, higher is better) against a cost (x, lower is better) in one panel per cost, with the
    Pareto front drawn as a dashed staircase and the fp32 parent as a large star."""
    panels = [p for p in panels if p.points]
    figure = _figure(4.6 * len(panels) + 1.6, 4.0)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    commands = sorted({p.command for panel in panels for p in panel.points if not p.parent})
    shade = dict(zip(commands, _shades(len(commands))))
    for ax, panel in zip(axes, panels):
        points = panel.points
        front = pareto_front([(p.x, p.y) for p in points])
        fx, fy = [points[i].x for i in front], [points[i].y for i in front]
        if len(front) > 1:
            ax.step(fx, fy, where="post", color="black", linestyle="--", linewidth=1.2, label="Pareto front", zorder=1)
        ax.scatter(fx, fy, s=260, facecolors="none", edgecolors="black", linewidths=1.0, zorder=2,
                   label="on the front" if len(front) > 1 else "best")
        seen_legend = set()
        labelled = set()
        for p in points:
            if p.parent:
                kwargs = {"marker": PARENT_MARKER, "s": 220, "color": "black", "label": "fp32 parent"}
                key = "parent"
            else:
                kwargs = {"marker": MARKERS.get(p.command, "o"), "s": 70, "color": shade[p.command],
                          "edgecolors": "black", "linewidths": 0.8, "label": p.command}
                key = p.command
            if key in seen_legend:
                kwargs.pop("label")
            seen_legend.add(key)
            ax.scatter([p.x], [p.y], zorder=3, **kwargs)
            spot = (round(p.x, 3), round(p.y, 4), p.label)
            if spot not in labelled:
                labelled.add(spot)
                ax.annotate(_short(p.label), (p.x, p.y), textcoords="offset points", xytext=(6, 5), fontsize=7,
                            color="#222222")
        if panel.log_x:
            ax.set_xscale("log")
        ax.set_xlabel(panel.x_label)
        ax.set_ylabel(y_label)
        ax.grid(True, color="#dddddd", linewidth=0.6)
        _pad_limits(ax, [p.x for p in points], [p.y for p in points], panel.log_x)
    handles: dict[str, Any] = {}
    for ax in axes:  # one legend for all panels, outside them, each entry once
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    figure.legend(list(handles.values()), list(handles), fontsize=7, loc="outside right upper", markerscale=0.7)
    figure.suptitle(title, fontsize=10)
    return _png(figure)


def _pad_limits(ax: Any, xs: Sequence[float], ys: Sequence[float], log_x: bool) -> None:
    """Room for the point labels around the data (a fixed span when all values are equal)."""
    if not log_x:
        low, high = min(xs), max(xs)
        span = high - low or max(abs(high) * 0.2, 0.01)
        ax.set_xlim(max(0.0, low - 0.15 * span), high + 0.35 * span)
    low, high = min(ys), max(ys)
    span = high - low or max(abs(high) * 0.02, 0.01)
    ax.set_ylim(low - 0.15 * span, high + 0.2 * span)


# ------------------------------------------------------------------------------- per-layer SQNR
def sqnr_chart(layer_sqnr_db: dict[str, float], title: str, worst: int = 10) -> bytes:
    """One horizontal bar per layer in network order, the ``worst`` lowest-SQNR layers hatched and dark."""
    names = list(layer_sqnr_db)
    values = [layer_sqnr_db[n] for n in names]
    lowest = set(sorted(range(len(values)), key=lambda i: values[i])[:worst])
    figure = _figure(6.2, max(2.6, 1.3 + 0.14 * len(names)))
    ax = figure.subplots()
    positions = list(range(len(names)))
    colours = ["#333333" if i in lowest else "#b8b8b8" for i in positions]
    bars = ax.barh(positions, values, color=colours, edgecolor="black", linewidth=0.3, height=0.75)
    for i in lowest:
        bars[i].set_hatch("///")
    ax.set_yticks(positions, [_short(n, 34) for n in names], fontsize=6)
    ax.set_ylim(len(names) - 0.5, -0.5)  # first layer on top, as the network reads; no empty margin
    ax.set_xlabel("SQNR (dB) of int8 vs fp32 layer output\nhigher is better")
    ax.grid(True, axis="x", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(facecolor="#333333", hatch="///", label=f"{min(worst, len(names))} lowest"),
                       Patch(facecolor="#b8b8b8", label="other layers")], fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=10)
    return _png(figure)


# ---------------------------------------------------------------------------------- step tables
def steps_chart(names: Sequence[str], scores: Sequence[float | None], y_label: str, title: str,
                reference: float | None = None, gbops: Sequence[float | None] | None = None) -> bytes:
    """Horizontal bars of what each step or recipe scored (value printed on the bar), the fp32 score as a
    vertical dashed line; with ``gbops``, a second panel of the compute each step costs."""
    rows = len(names)
    panels = 2 if gbops and any(g is not None for g in gbops) else 1
    figure = _figure(5.0 + 3.4 * (panels - 1), 1.4 + 0.38 * rows)
    axes = figure.subplots(1, panels, squeeze=False, sharey=True)[0]
    positions = list(range(rows))
    values = [s if s is not None else 0.0 for s in scores]
    bars = axes[0].barh(positions, values, color="#9a9a9a", edgecolor="black", linewidth=0.5, height=0.7)
    for i, (bar, score) in enumerate(zip(bars, scores)):
        bar.set_hatch(HATCHES[i % len(HATCHES)])
        axes[0].annotate("n/a" if score is None else f"{score:.4f}", (bar.get_width(), bar.get_y() + 0.35),
                         xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    known = [s for s in scores if s is not None] + ([reference] if reference is not None else [])
    if known:
        low, high = min(known), max(known)
        span = max(high - low, 0.02)
        axes[0].set_xlim(max(0.0, low - span * 1.5), high + span * 0.8)
    if reference is not None:
        line = axes[0].axvline(reference, color="black", linestyle="--", linewidth=1.2)
        figure.legend([line], [f"fp32 parent: {reference:.4f}"], fontsize=7, loc="outside lower left")
    axes[0].set_yticks(positions, [_short(n, 44) for n in names], fontsize=7)
    axes[0].invert_yaxis()
    axes[0].set_xlabel(f"{y_label}, higher is better\n(axis not from 0)")
    axes[0].grid(True, axis="x", color="#dddddd", linewidth=0.6)
    axes[0].set_axisbelow(True)
    if panels == 2:
        cost = [g if g is not None else 0.0 for g in gbops]
        axes[1].barh(positions, cost, color="#d0d0d0", edgecolor="black", linewidth=0.5, height=0.7, hatch="..")
        for i, g in enumerate(gbops):
            axes[1].annotate("n/a" if g is None else f"{g:,.1f}", (cost[i], i), xytext=(3, 0),
                             textcoords="offset points", va="center", fontsize=7)
        axes[1].set_xlabel("GBOPs per image, lower is cheaper\n(MACs x weight bits x activation bits / 1e9)")
        axes[1].set_xlim(0, max(cost or [1.0]) * 1.3 or 1.0)
        axes[1].grid(True, axis="x", color="#dddddd", linewidth=0.6)
        axes[1].set_axisbelow(True)
    figure.suptitle(title, fontsize=10)
    return _png(figure)


def sensitivity_chart(targets: Sequence[str], amounts: Sequence[float], drops: Sequence[Sequence[float | None]],
                      title: str) -> bytes:
    """A greyscale heat map: one row per pruned target, one column per amount, the accuracy drop printed in
    each cell (darker is a larger drop)."""
    import numpy as np

    table = np.array([[math.nan if d is None else d for d in row] for row in drops], dtype=float)
    figure = _figure(1.8 + 0.9 * len(amounts), 1.3 + 0.26 * len(targets))
    ax = figure.subplots()
    finite = table[np.isfinite(table)]
    top = float(finite.max()) if finite.size else 1.0
    image = ax.imshow(table, cmap="Greys", vmin=min(0.0, float(finite.min()) if finite.size else 0.0),
                      vmax=top if top > 0 else 1.0, aspect="auto")
    for (r, c), value in np.ndenumerate(table):
        if math.isfinite(value):
            ax.text(c, r, f"{value:.3f}", ha="center", va="center", fontsize=6,
                    color="white" if value > 0.55 * top else "black")
    ax.set_xticks(range(len(amounts)), [f"{a:g}" for a in amounts], fontsize=7)
    ax.set_yticks(range(len(targets)), [_short(t, 34) for t in targets], fontsize=6)
    ax.set_xlabel("fraction pruned (that target alone)")
    figure.colorbar(image, ax=ax, label="accuracy drop (baseline minus pruned, 0-1)", shrink=0.8)
    ax.set_title(title, fontsize=10)
    return _png(figure)


def history_chart(history: Sequence[dict[str, float]], title: str) -> bytes:
    """Losses per epoch (left axis) and, when recorded, validation accuracy (right axis), each series with
    its own dash pattern and marker."""
    epochs = [row["epoch"] for row in history]
    losses = [k for k in history[0] if k.endswith("loss")]
    accuracy = [k for k in history[0] if "mAP" in k or k.endswith("AP")]
    figure = _figure(4.8, 3.5)
    ax = figure.subplots()
    handles = []
    for i, key in enumerate(losses):
        handles += ax.plot(epochs, [row.get(key, math.nan) for row in history], color="black",
                           linestyle=LINESTYLES[i % len(LINESTYLES)], marker="os^D"[i % 4], markersize=4,
                           label=key.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.grid(True, color="#dddddd", linewidth=0.6)
    if accuracy:
        right = ax.twinx()
        for i, key in enumerate(accuracy):
            handles += right.plot(epochs, [row.get(key, math.nan) for row in history], color="#6b6b6b",
                                  linestyle=LINESTYLES[(len(losses) + i) % len(LINESTYLES)], marker="v", markersize=5,
                                  label=key.replace("_", " ") + " (right axis)")
        right.set_ylabel("validation mAP (0-1)")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if handles:
        figure.legend(handles=handles, fontsize=7, loc="outside lower center", ncols=min(3, len(handles)))
    ax.set_title(title, fontsize=10)
    return _png(figure)


__all__ = [
    "Panel",
    "Point",
    "available",
    "history_chart",
    "sensitivity_chart",
    "sqnr_chart",
    "steps_chart",
    "tradeoff_chart",
]
