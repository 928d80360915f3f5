"""Every command's report: ``eval_results/<name>.json`` (machine-readable) + ``<name>.md`` (for people).

Both files are written atomically, after the command succeeded, so a failed run never leaves a
half-written or clobbered report behind.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcompress.errors import QCompressError
from qcompress.io_utils import write_json_atomic, write_text_atomic


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, dict):  # recipes and amounts: key=value pairs, not Python reprs
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items()) or "–"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value) or "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; NaN and None show as "–", explained under the table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for row in rows for v in row):
        lines.append("\n– : not applicable (for AP: no objects of this class in these images).")
    return "\n".join(lines)


@dataclass
class Report:
    """A titled report: ``data`` goes to JSON verbatim; ``sections`` are Markdown blocks in order."""

    name: str
    title: str
    data: dict[str, Any] = field(default_factory=dict)
    sections: list[tuple[str, str]] = field(default_factory=list)

    def add(self, heading: str, markdown: str) -> None:
        self.sections.append((heading, markdown))

    def markdown(self) -> str:
        parts = [f"# {self.title}", ""]
        for heading, body in self.sections:
            parts += [f"## {heading}", "", body.rstrip(), ""]
        return "\n".join(parts)


def check_report_target(out_dir: Path, name: str, checkpoints: Iterable[Path] = ()) -> None:
    """Refuse a report whose JSON would be the sidecar of a checkpoint: one that exists, or one this job will
    write (``checkpoints``). Jobs call it before any long work, :func:`write_report` again before writing."""
    json_path = Path(out_dir) / f"{name}.json"
    clashes = [Path(c) for c in checkpoints if Path(c).with_suffix(".json").resolve() == json_path.resolve()]
    if clashes or json_path.with_suffix(".pth").exists():
        checkpoint = clashes[0] if clashes else json_path.with_suffix(".pth")
        raise QCompressError(f"report {json_path} would overwrite the sidecar of checkpoint {checkpoint}",
                             "choose another --report-name or --out-dir")


def write_report(report: Report, out_dir: Path = Path("eval_results")) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    data = {"report": report.name, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    data.update(report.data)
    json_path, md_path = out_dir / f"{report.name}.json", out_dir / f"{report.name}.md"
    check_report_target(out_dir, report.name)
    write_json_atomic(json_path, data)
    write_text_atomic(md_path, report.markdown())
    return json_path, md_path
