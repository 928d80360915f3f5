"""``qcompress report``: one self-contained HTML page from every JSON report in a folder — the model zoo
grouped by parent checkpoint, accuracy against latency and size with the Pareto front, per-layer SQNR,
step tables and training curves as charts, and the detection galleries."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qcompress.core import Progress, no_progress
from qcompress.defaults import DEFAULT_REPORTS
from qcompress.errors import QCompressError
from qcompress.io_utils import check_writable, write_text_atomic
from qcompress.reports import Report
from qcompress.reports.html import build_page
from qcompress.reports.zoo import Group, group_variants, read_folder

DEFAULT_TITLE = "qcompress: what compression cost and what it bought"


@dataclass(frozen=True)
class ReportConfig:
    dir: Path = DEFAULT_REPORTS  # the folder of JSON reports (not searched recursively)
    out: Path | None = None  # default: <dir>/index.html
    title: str = DEFAULT_TITLE
    charts: bool = True  # False: tables only, as when matplotlib is missing

    @property
    def out_path(self) -> Path:
        return Path(self.out) if self.out is not None else Path(self.dir) / "index.html"


@dataclass
class ReportResult:
    out: Path
    reports: list[str]  # file names read, in name order
    skipped: list[str]  # one line per JSON file not shown: "name.json: reason"
    groups: list[Group]
    charts: int  # charts embedded
    images_embedded: int = 0
    images_linked: int = 0
    missing_images: list[str] = field(default_factory=list)
    charts_unavailable: str | None = None  # why the page has tables only

    @property
    def variants(self) -> int:
        return sum(len(g.variants) for g in self.groups)


def report(config: ReportConfig, progress: Progress = no_progress) -> tuple[ReportResult, Report | None]:
    """``qcompress report``: read every ``*.json`` in ``config.dir`` and write the HTML page to
    ``config.out``. Files that are not readable reports are listed on the page (and in the result), never
    fatal. The page is the report: no JSON + Markdown report is written, so the second value is None."""
    folder = Path(config.dir)
    if not folder.is_dir():
        raise QCompressError(f"report folder not found: {folder}", "run a command first, or pass --dir")
    out = config.out_path
    if out.suffix.lower() not in (".html", ".htm"):
        raise QCompressError(f"--out {out} should end in .html", "e.g. --out eval_results/index.html")
    check_writable(out, "--out")
    advance = progress("reports", len(list(folder.glob("*.json"))))
    entries, skipped = read_folder(folder, advance)
    page = build_page(entries, skipped, title=config.title, source_dir=folder, out_path=out, charts=config.charts)
    write_text_atomic(out, page.html)
    out.chmod(0o644)  # the atomic write's temporary file is private (0600); a page is for reading
    result = ReportResult(
        out=out, reports=[e.file for e in entries], skipped=skipped, groups=group_variants(entries),
        charts=page.charts, images_embedded=page.images_embedded, images_linked=page.images_linked,
        missing_images=page.missing_images, charts_unavailable=page.charts_unavailable,
    )
    return result, None


run = report

__all__ = ["DEFAULT_TITLE", "ReportConfig", "ReportResult", "report", "run"]
