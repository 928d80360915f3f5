"""The Typer application: every command registered here, explicitly, in the order ``--help`` lists them."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

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

try:  # typer 0.2x vendors click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import exceptions as click_errors  # type: ignore[no-redef]


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


class OneLineErrors(TyperGroup):
    """Usage errors (an unknown option, a value that does not parse, a missing argument) as one ``error:`` line
    naming the problem and where the help is, exit code 2, like every other bad input (Typer draws a panel)."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click_errors.NoArgsIsHelpError as error:  # bare `qcompress`: the help, as Typer shows it
            from typer import rich_utils

            rich_utils.rich_format_error(error)
            sys.exit(error.exit_code)
        except click_errors.ClickException as error:
            message = " ".join(error.format_message().split())
            if isinstance(error, click_errors.UsageError):
                context = getattr(error, "ctx", None)
                message += f" (see '{context.command_path if context is not None else 'qcompress'} --help')"
            err_console.print(f"error: {message}", markup=False, highlight=False)
            sys.exit(error.exit_code)
        except typer.Abort:
            err_console.print("error: aborted", markup=False, highlight=False)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
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
