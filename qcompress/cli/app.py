"""The Typer application: every command registered here, explicitly, in the order ``--help`` lists them."""

from __future__ import annotations

from typing import Annotated

import typer

from qcompress._warnings import install_filters
from qcompress.cli.bench_cmd import bench_cmd, compare_cmd, detect_cmd
from qcompress.cli.common import DEBUG, err_console
from qcompress.cli.eval_cmd import eval_cmd, models_cmd
from qcompress.cli.export_cmd import export_cmd
from qcompress.cli.prune_cmd import prune_cmd
from qcompress.cli.qat_cmd import qat_cmd
from qcompress.cli.quantize_cmd import quantize_cmd
from qcompress.cli.report_cmd import report_cmd
from qcompress.cli.train_cmd import train_cmd


def _plain_placeholders() -> None:
    """Help without Python-type placeholders: flags take no value (typer 0.29 prints ``<bool>``, which
    invites ``--equalize true``), and list options read ``PATH ...`` instead of ``<list[Path]>``."""
    from typer.core import TyperOption

    original = TyperOption.display_type_rich
    if getattr(original, "_qcompress", False):
        return

    def display_type_rich(self, ctx):
        if self.is_flag or self.is_bool_flag:
            return None
        shown = original(self, ctx)
        if isinstance(shown, str) and shown.startswith("<list["):
            return shown[len("<list["):-2].upper() + " ..."
        return shown

    display_type_rich._qcompress = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_plain_placeholders()

app = typer.Typer(
    name="qcompress",
    help="Compress trained object detectors (pruning, int8 and low-bit quantization) and measure what it cost "
    "and bought.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    DEBUG.set(debug)  # read by cli.common.command at the error boundary


COMMANDS = (
    ("models", models_cmd),
    ("eval", eval_cmd),
    ("train", train_cmd),
    ("quantize", quantize_cmd),
    ("prune", prune_cmd),
    ("qat", qat_cmd),
    ("export", export_cmd),
    ("bench", bench_cmd),
    ("compare", compare_cmd),
    ("detect", detect_cmd),
    ("report", report_cmd),
)
for _name, _function in COMMANDS:
    app.command(_name)(_function)


def main() -> None:
    install_filters()
    app()


__all__ = ["app", "err_console", "main"]
