"""The report page: one self-contained HTML file built from the reports in a folder.

Everything the page needs is inside it (CSS inline, charts as base64 PNG, gallery pictures embedded up to
a budget and linked relatively beyond it), so it opens from disk with no server and no network. The
numbers behind every chart are in a table beside it, which is all that shows when matplotlib is missing.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcompress.io_utils import json_safe
from qcompress.reports import plots
from qcompress.reports.zoo import UNKNOWN_PARENT, Entry, Group, Variant, group_variants, json_for_page

MAX_EMBEDDED_IMAGE_BYTES = 2_000_000  # one gallery picture larger than this is linked, not embedded
MAX_EMBEDDED_TOTAL_BYTES = 12_000_000  # gallery pictures past this total are linked
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp"}

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1500px;
padding:0 24px 48px;color:#1a1a1a;background:#fff}
h1{font-size:24px;margin:24px 0 4px}h2{font-size:19px;margin:36px 0 8px;border-bottom:2px solid #333}
h3{font-size:15px;margin:24px 0 6px}code{font-size:12px;background:#f2f2f2;padding:0 3px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:12px}
th,td{border:1px solid #c8c8c8;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#ececec}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.parent td{font-weight:600;background:#f7f7f7}
img.chart{max-width:100%;height:auto;border:1px solid #ddd;margin:4px 0}
.grid{display:flex;flex-wrap:wrap;gap:10px 22px;align-items:flex-start}.grid>div{width:min-content}.grid img.chart{max-width:none}
img.gallery{max-width:100%;height:auto;border:1px solid #ccc;margin:2px 0 10px}
.note{color:#555;font-size:12px}nav a{margin-right:14px}
details{margin:2px 0 14px}summary{cursor:pointer;color:#444;font-size:12px}
ul.skipped li{font-family:ui-monospace,monospace;font-size:12px}
"""


@dataclass
class Page:
    """The built page and what went into it."""

    html: str
    charts: int = 0
    images_embedded: int = 0
    images_linked: int = 0
    missing_images: list[str] = field(default_factory=list)
    charts_unavailable: str | None = None  # why there are no charts (matplotlib missing)


# ------------------------------------------------------------------------------------ formatting
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cell(value: Any, digits: int = 4, scale: float = 1.0) -> str:
    if value is None:
        return '<td class="n">–</td>'
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value * scale
        text = f"{number:,.{digits}f}" if isinstance(number, float) or scale != 1.0 else f"{number:,}"
        return f'<td class="n">{text}</td>'
    return f"<td>{_e(value)}</td>"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], css_rows: Sequence[str] = ()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        css = f' class="{css_rows[i]}"' if i < len(css_rows) and css_rows[i] else ""
        body.append(f"<tr{css}>" + "".join(row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(data: bytes, alt: str, css: str = "chart", mime: str = "image/png") -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img class="{css}" alt="{_e(alt)}" src="data:{mime};base64,{encoded}">'


def _details(summary: str, body: str, open_: bool) -> str:
    return f"<details{' open' if open_ else ''}><summary>{_e(summary)}</summary>{body}</details>"


def _is_parent(v: Variant) -> bool:
    return v.role == "parent" or (v.sha256 is not None and v.sha256 == v.group)


# ------------------------------------------------------------------------------------ the builder
class _Builder:
    def __init__(self, source_dir: Path, out_path: Path, charts: bool) -> None:
        self.source_dir = Path(source_dir)
        self.out_path = Path(out_path)
        self.page = Page("")
        self.page.charts_unavailable = plots.available() if charts else "charts switched off"
        self.embedded_bytes = 0

    def chart(self, draw: Callable[[], bytes], alt: str) -> str:
        """The chart as an embedded PNG, or nothing when charts are unavailable or this one failed."""
        if self.page.charts_unavailable:
            return ""
        try:
            data = draw()
        except (ValueError, TypeError, OverflowError, RuntimeError) as exc:  # odd numbers in an odd report
            return f'<p class="note">chart not drawn: {_e(exc.__class__.__name__)}: {_e(exc)}</p>'
        self.page.charts += 1
        return _img(data, alt)

    def picture(self, relative: str, alt: str) -> str:
        """A gallery picture from the reports folder: embedded while within budget, else a relative link."""
        path = self.source_dir / relative
        if not path.is_file():
            self.page.missing_images.append(relative)
            return f'<p class="note">picture missing: <code>{_e(relative)}</code></p>'
        link = Path(os.path.relpath(path.resolve(), self.out_path.resolve().parent)).as_posix()
        size = path.stat().st_size
        mime = _MIME.get(path.suffix.lower())
        if mime and size <= MAX_EMBEDDED_IMAGE_BYTES and self.embedded_bytes + size <= MAX_EMBEDDED_TOTAL_BYTES:
            self.embedded_bytes += size
            self.page.images_embedded += 1
            return f'<a href="{_e(link)}">{_img(path.read_bytes(), alt, "gallery", mime)}</a>'
        self.page.images_linked += 1
        return f'<p><a href="{_e(link)}">{_e(alt)}</a> (linked: too large to embed)</p>'


def _zoo_section(b: _Builder, groups: Sequence[Group]) -> str:
    parts = ['<h2 id="zoo">Model zoo</h2>',
             ('<p class="note">Every model a report measured, grouped by the fp32 checkpoint it was made from '
             '(sha256 from the report\'s model summary, the checkpoint sidecar, or the report that wrote the file). '
             'Bold rows are that parent as each report measured it. Latency: median of batch-1 forward passes '
             '(network only, no decoding or NMS) per runtime and thread count; numbers from different reports '
             'were measured at different times on possibly different machines.</p>')]
    if not groups:
        parts.append("<p>No report in this folder measured a model.</p>")
    for number, group in enumerate(groups, 1):
        heading = (f"{_e(group.parent_name)} <code>{_e(group.key[:12])}</code>" if group.key != UNKNOWN_PARENT
                   else "Parent unknown (reports without a checkpoint sha256)")
        parts.append(f'<h3 id="group-{number}">{heading}</h3>')
        parts.append(_group_table(group))
        parts.append(_tradeoff_charts(b, group))
    return "\n".join(parts)


def _group_table(group: Group) -> str:
    keys = sorted({k for v in group.variants for k in v.latency_ms}, key=lambda k: (not k.startswith("torch"), k))
    headers = ["variant", "role", "report", "command", "parent (sha256)", "recipe", "accuracy", "metric",
               *[f"latency ms ({k})" for k in keys], "size MB", "params M", "GMACs", "GBOPs"]
    rows, css = [], []
    for v in group.variants:
        parent = (f"{v.parent_name or ''} {v.parent_sha256[:12]}".strip() if v.parent_sha256
                  else "unknown")
        rows.append([
            f"<td>{_e(v.name)}</td>", f"<td>{_e(v.role)}</td>", f"<td>{_e(v.report)}</td>",
            f"<td>{_e(v.command)}</td>",
            f'<td title="{_e(v.parent_sha256 or "")}">{_e(parent)}</td>', f"<td>{_e(v.recipe or '–')}</td>",
            _cell(v.accuracy), f"<td>{_e(v.accuracy_kind or '–')}</td>",
            *[_cell(v.latency_ms.get(k), 2) for k in keys],
            _cell(v.size_bytes, 3, 1e-6), _cell(v.params, 3, 1e-6), _cell(v.macs, 3, 1e-9), _cell(v.bops, 1, 1e-9),
        ])
        css.append("parent" if _is_parent(v) else "")
    return _table(headers, rows, css)


def tradeoff_panels(variants: Sequence[Variant]) -> dict[str, list[plots.Panel]]:
    """Per accuracy kind: an accuracy-vs-latency panel (under the runtime and thread count most of its
    variants were timed with) and an accuracy-vs-size panel, each kept only with two points or more."""
    out: dict[str, list[plots.Panel]] = {}
    kinds = sorted({v.accuracy_kind for v in variants if v.accuracy is not None and v.accuracy_kind})
    for kind in kinds:
        members = [v for v in variants if v.accuracy is not None and v.accuracy_kind == kind]
        counts: dict[str, int] = {}
        for v in members:
            for key in v.latency_ms:
                counts[key] = counts.get(key, 0) + 1
        panels = []
        if counts:
            key = max(sorted(counts), key=lambda k: counts[k])
            points = [plots.Point(v.latency_ms[key], v.accuracy, "" if _is_parent(v) else v.name, v.command,
                                  _is_parent(v)) for v in members if key in v.latency_ms]
            panels.append(plots.Panel(f"latency (ms, median per image; {key}, batch 1)", points))
        points = [plots.Point(v.size_bytes / 1e6, v.accuracy, "" if _is_parent(v) else v.name, v.command,
                              _is_parent(v)) for v in members if v.size_bytes]
        panels.append(plots.Panel("size on disk (MB)", points))
        # A panel says something with two points, one of them not the parent (repeats of it are not a trade-off).
        panels = [p for p in panels if len(p.points) >= 2 and any(not q.parent for q in p.points)]
        if panels:
            out[kind] = panels
    return out


def _tradeoff_charts(b: _Builder, group: Group) -> str:
    parts = []
    for kind, panels in tradeoff_panels(group.variants).items():
        y_label = f"{kind} (0-1, higher is better)"
        title = f"{group.parent_name}: {kind} against cost"
        parts.append(b.chart(lambda p=panels, y=y_label, t=title: plots.tradeoff_chart(p, y, t),
                             f"accuracy against latency and size, {group.parent_name}, {kind}"))
    if not parts:
        parts.append('<p class="note">No trade-off plot: fewer than two variants here have both an accuracy '
                     'and a latency or size under one metric.</p>')
    return "\n".join(parts)


def _sqnr_section(b: _Builder, entries: Sequence[Entry]) -> str:
    chosen = [e for e in entries if e.layer_sqnr_db]
    if not chosen:
        return ""
    parts = ['<h2 id="sqnr">Per-layer SQNR of quantized variants</h2>',
             ('<p class="note">Signal-to-quantization-noise ratio of each quantized layer\'s output against the '
             'float layer on calibration images (from <code>quantize</code> reports). Low bars are where int8 '
             'loses the most; the ten lowest are dark and hatched.</p>')]
    parts.append('<div class="grid">')
    for e in chosen:
        parts.append(f'<div><h3 id="sqnr-{_e(e.name)}">{_e(e.name)}</h3>')
        parts.append(b.chart(lambda e=e: plots.sqnr_chart(e.layer_sqnr_db, f"{e.name}: per-layer SQNR"),
                             f"per-layer SQNR of {e.name}"))
        worst = sorted(e.layer_sqnr_db.items(), key=lambda kv: kv[1])[:10]
        parts.append(_details("the 10 lowest layers (dB)", _table(
            ["layer", "SQNR dB"], [[f"<td>{_e(k)}</td>", _cell(v, 2)] for k, v in worst]),
            open_=bool(b.page.charts_unavailable)) + "</div>")
    parts.append("</div>")
    return "\n".join(parts)


def _steps_section(b: _Builder, entries: Sequence[Entry]) -> str:
    items = []
    no_charts = bool(b.page.charts_unavailable)
    for e in entries:
        if e.steps:
            kind = e.accuracy_kind or "accuracy"
            what = "QAT steps" if e.command == "qat" else "quantization recipes"
            gbops = [s.gbops for s in e.steps] if any(s.gbops is not None for s in e.steps) else None
            rows = [[f"<td>{_e(s.name)}</td>", _cell(s.accuracy), _cell(s.gbops, 1), f"<td>{_e(s.note)}</td>"]
                    for s in e.steps]
            items.append([
                f'<h3 id="steps-{_e(e.name)}">{_e(e.name)}: {what}</h3>',
                b.chart(lambda e=e, k=kind, g=gbops: plots.steps_chart(
                    [s.name for s in e.steps], [s.accuracy for s in e.steps], k,
                    f"{e.name}: {k} per {'step' if e.command == 'qat' else 'recipe'}",
                    e.steps_reference, g), f"{what} of {e.name}"),
                _details("numbers", _table(["step", kind, "GBOPs", "description"], rows), no_charts)])
        if e.sensitivity:
            s = e.sensitivity
            baseline = f" (baseline {s.baseline:.4f})" if s.baseline is not None else ""
            rows = [[f"<td>{_e(t)}</td>", *[_cell(d) for d in row]] for t, row in s.drops.items()]
            items.append([
                f'<h3 id="sensitivity-{_e(e.name)}">{_e(e.name)}: pruning sensitivity</h3>',
                b.chart(lambda s=s, e=e, t=baseline: plots.sensitivity_chart(
                    list(s.drops), s.amounts, list(s.drops.values()), f"{e.name}: accuracy drop{t}"),
                    f"pruning sensitivity of {e.name}"),
                _details("numbers", _table(["target", *[f"drop at {a:g}" for a in s.amounts]], rows), no_charts)])
        if len(e.history) >= 2:  # one epoch is a dot, not a curve: its numbers are in the report
            keys = list(e.history[0])
            rows = [[_cell(row.get(k), 4 if k != "epoch" else 0) for k in keys] for row in e.history]
            items.append([
                f'<h3 id="history-{_e(e.name)}">{_e(e.name)}: training per epoch ({_e(e.command)})</h3>',
                b.chart(lambda e=e: plots.history_chart(e.history, f"{e.name}: per epoch"),
                        f"training history of {e.name}"),
                _details("numbers", _table(keys, rows), no_charts)])
    if not items:
        return ""
    return "\n".join(['<h2 id="steps">Steps and training as charts</h2>',
                      ('<p class="note">QAT step tables, the quantization recipe ladder, pruning sensitivity '
                       'scans and per-epoch training curves.</p>'),
                      '<div class="grid">', *("<div>" + "".join(item) + "</div>" for item in items), "</div>"])


def _gallery_section(b: _Builder, entries: Sequence[Entry]) -> str:
    chosen = [e for e in entries if e.gallery]
    if not chosen:
        return ""
    parts = ['<h2 id="galleries">Detection galleries</h2>',
             ('<p class="note">From <code>compare</code> reports: the same images, each model\'s detections side '
             'by side.</p>')]
    for e in chosen:
        parts.append(f'<h3 id="gallery-{_e(e.name)}">{_e(e.name)}</h3>')
        for image in e.gallery:
            parts.append(f"<p><b>{_e(image.image_id)}</b></p>")
            parts.append(b.picture(image.file, f"{e.name}: {image.image_id}"))
    return "\n".join(parts)


def _reports_section(b: _Builder, entries: Sequence[Entry], skipped: Sequence[str]) -> str:
    rows = []
    for e in entries:
        markdown = b.source_dir / (Path(e.file).stem + ".md")
        link = Path(os.path.relpath(markdown.resolve(), b.out_path.resolve().parent)).as_posix()
        shows = ", ".join(what for what, present in (
            (f"{len(e.variants)} model{'' if len(e.variants) == 1 else 's'}", e.variants), ("per-layer SQNR", e.layer_sqnr_db), ("steps", e.steps),
            ("sensitivity", e.sensitivity), ("per-epoch history", e.history), ("gallery", e.gallery)) if present)
        rows.append([f"<td>{_e(e.name)}</td>", f"<td>{_e(e.command)}</td>", f"<td>{_e(e.created or '–')}</td>",
                     f"<td>{_e(shows)}</td>",
                     f'<td><a href="{_e(link)}">{_e(markdown.name)}</a></td>' if markdown.is_file()
                     else f"<td>{_e(e.file)}</td>"])
    parts = ['<h2 id="reports">Reports read</h2>',
             _table(["report", "command", "created", "on this page", "details"], rows) if rows
             else "<p>None.</p>",
             f'<h2 id="skipped">Skipped ({len(skipped)})</h2>']
    if skipped:
        parts.append('<ul class="skipped" id="skipped-list">' + "".join(f"<li>{_e(s)}</li>" for s in skipped)
                     + "</ul>")
    else:
        parts.append('<p class="note">Every JSON file in the folder was read.</p>')
    return "\n".join(parts)


def build_page(entries: Sequence[Entry], skipped: Sequence[str], *, title: str, source_dir: Path,
               out_path: Path, charts: bool = True) -> Page:
    """The HTML page for ``entries`` (reports read from ``source_dir``) and the ``skipped`` lines.
    ``out_path`` is where the page will be written (relative links are computed from it). Charts need
    matplotlib; without it (or with ``charts=False``) the page shows the same numbers as tables."""
    b = _Builder(source_dir, out_path, charts)
    groups = group_variants(entries)
    sections = [_zoo_section(b, groups), _sqnr_section(b, entries), _steps_section(b, entries),
                _gallery_section(b, entries), _reports_section(b, entries, skipped)]
    nav = [("zoo", "Model zoo"), ("sqnr", "Per-layer SQNR"), ("steps", "Steps"), ("galleries", "Galleries"),
           ("reports", "Reports"), ("skipped", "Skipped")]
    present = "".join(sections)
    links = " ".join(f'<a href="#{anchor}">{_e(text)}</a>' for anchor, text in nav if f'id="{anchor}"' in present)
    intro = (f'<p>Built by <code>qcompress report</code> from {len(entries)} report(s) in '
             f'<code>{_e(source_dir)}</code>; {len(skipped)} JSON file(s) skipped (listed at the end). '
             f'{sum(len(g.variants) for g in groups)} measured models in {len(groups)} group(s) by parent '
             'checkpoint.</p>')
    if b.page.charts_unavailable:
        intro += (f'<p class="note" id="no-charts">No charts: {_e(b.page.charts_unavailable)}. The tables carry '
                  'the same numbers (<code>pip install matplotlib</code> for the charts).</p>')
    data = json.dumps(json_safe(json_for_page(entries, skipped, groups)), allow_nan=False, sort_keys=True)
    data = data.replace("<", "\\u003c")  # no "</script>" can end the block early
    b.page.html = "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>", intro, f"<nav>{links}</nav>", *sections,
        f'<script type="application/json" id="qcompress-report-data">{data}</script>',
        "</body></html>", "",
    ])
    return b.page


__all__ = ["MAX_EMBEDDED_IMAGE_BYTES", "MAX_EMBEDDED_TOTAL_BYTES", "Page", "build_page", "tradeoff_panels"]
