"""Progress bars for long loops (rich), as a callback the pure core can call."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextmanager
def progress_bar(
    description: str, total: int, *, enabled: bool = True
) -> Iterator[Callable[[int], None]]:
    """``with progress_bar("tables", total) as advance: advance(k)``; silent when disabled."""
    if not enabled:
        yield lambda k=1: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda k=1: bar.advance(task, k)


_console = Console(soft_wrap=True, markup=False, highlight=False)


def note(message: str, *, enabled: bool = True) -> None:
    """One line beside the progress bars (e.g. what a resumed job found); silent when the bars
    are off. Never wrapped, so a path in it stays whole."""
    if enabled:
        _console.print(message)
