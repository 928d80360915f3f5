"""What every command shares: error handling at the boundary, Rich consoles and progress bars."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from qcompress.errors import QCompressError

F = TypeVar("F", bound=Callable[..., Any])

console = Console()
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


# Set by the root callback on every invocation (so a test runner's next call starts clean).
DEBUG: ContextVar[bool] = ContextVar("qcompress_debug", default=False)


def debug_enabled() -> bool:
    """``qcompress --debug`` was given: errors re-raise with their traceback."""
    return DEBUG.get()


def command(fn: F) -> F:
    """Run a command body; a QCompressError becomes one ``error:`` line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = fn(*args, **kwargs)
            out_dir = kwargs.get("out_dir")
            if out_dir is not None:  # every command that writes a report ends with where to see them all
                console.print(f"[dim]all reports side by side: qcompress report --dir {out_dir}[/]")
            return result
        except QCompressError as exc:
            if debug_enabled():
                raise
            err_console.print(f"[bold red]error:[/] {exc.message}" + (f" [dim]({exc.hint})[/]" if exc.hint else ""))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]error:[/] interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def rich_progress() -> Iterator[Callable[[str, int | None], Callable[[int], None]]]:
    """One Rich progress display on stderr; yields the library's progress factory
    ``(description, total) -> advance(n)``, each call adding a bar."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,  # bars vanish when done (or failed): the tables and error lines remain
        disable=not err_console.is_terminal,  # no bar debris in logs and pipes
    )
    with progress:

        def factory(description: str, total: int | None) -> Callable[[int], None]:
            task = progress.add_task(description, total=total)
            return lambda n=1: progress.advance(task, n)

        yield factory


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
