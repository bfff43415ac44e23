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


# Hub downloads draw here (stderr: what a command prints on stdout stays clean when piped).
HUB_CONSOLE = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)


class _HubBar:
    """The part of tqdm's interface that huggingface_hub's downloads call (construct, update,
    total, descriptions, close, iterate), drawn as a task of a shared rich Progress."""

    progress: Progress  # bound by ``hub_progress``
    label: str = ""

    def __init__(self, iterable=None, *_, desc=None, total=None, initial=0, disable=False, **__):
        self.iterable, self.n, self._total = iterable, initial or 0, total
        self.format_dict: dict = {"rate": None}
        self._task = None
        if not disable:
            self._task = self.progress.add_task(
                self._describe(desc), total=total or None, completed=self.n
            )

    def _describe(self, desc) -> str:
        return f"{self.label}: {desc or ''}" if self.label else desc or ""

    @property
    def total(self):
        return self._total

    @total.setter
    def total(self, value) -> None:
        self._total = value
        if self._task is not None:
            self.progress.update(self._task, total=value or None)

    def update(self, n=1) -> None:
        self.n += n or 0
        if self._task is not None:
            self.progress.update(self._task, completed=self.n)

    def set_description(self, desc=None, refresh=True) -> None:
        if self._task is not None:
            self.progress.update(self._task, description=self._describe(desc))

    set_description_str = set_description

    def set_postfix_str(self, *_, **__) -> None:
        pass

    set_postfix = refresh = set_postfix_str

    def close(self) -> None:
        if self._task is not None and not self.n:  # a bar that never moved says nothing
            self.progress.remove_task(self._task)
            self._task = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __len__(self) -> int:
        return len(self.iterable) if self.total is None else int(self.total)


@contextmanager
def hub_progress(label: str = "", *, enabled: bool = True) -> Iterator[type]:
    """A tqdm-shaped class for huggingface_hub's ``tqdm_class=``: its bars (described as
    ``label: …``) are drawn by rich like ours (transient, on stderr), never by tqdm; silent
    (but still a valid class) when disabled."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=HUB_CONSOLE,
        transient=True,
        disable=not (enabled and HUB_CONSOLE.is_terminal),  # piped: no stray blank line
    )
    bar = type("HubBar", (_HubBar,), {"progress": progress, "label": label})
    with progress:
        yield bar
