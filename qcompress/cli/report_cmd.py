"""``qcompress report``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qcompress.cli.common import command, console, rich_progress


@command
def report_cmd(
    dir: Annotated[Path, typer.Option("--dir", help="Folder of JSON reports written by the other commands.")] = Path(
        "eval_results"),
    out: Annotated[Path | None, typer.Option(help="The HTML page to write. Default: DIR/index.html.")] = None,
) -> None:
    """Build one self-contained HTML page from the JSON reports in a folder.

    The page opens from disk (no server, no network): every measured model in a table grouped by its
    parent checkpoint, accuracy against latency and size with the Pareto front, per-layer SQNR of
    quantized models, QAT steps, recipe tables, pruning sensitivity and training curves as charts, and
    the detection galleries of `compare`. Files that are not readable reports are listed on the page.
    Prints the page's path.
    """
    from qcompress.jobs.report import ReportConfig, report

    with rich_progress() as progress:
        result, _ = report(ReportConfig(dir=dir, out=out), progress=progress)
    summary = (f"{len(result.reports)} reports, {result.variants} measured models in {len(result.groups)} groups, "
               f"{result.charts} charts; {len(result.skipped)} JSON files skipped (listed on the page).")
    console.print(summary, highlight=False)
    if result.charts_unavailable:
        console.print(f"[yellow]tables only:[/] {result.charts_unavailable}", highlight=False)
    typer.echo(str(result.out))
