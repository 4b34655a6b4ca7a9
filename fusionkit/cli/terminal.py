"""What the command line shows besides its results: progress bars and table titles.

- Progress bars go to stderr and only to a terminal: with ``--no-progress``, or when stderr is
  piped or redirected to a file (scripts, CI logs), nothing is drawn, not even a final bar.
  rich redraws at most ``REFRESH_PER_SECOND`` times a second from its own thread, so the loops
  that advance a bar once per batch pay for a counter update, not for drawing.
- Library code never imports rich: it takes an ``Advance`` callback (told how many samples were
  just processed) or a ``StartTask`` (``(description, total) -> Advance``, one bar per stage);
  :func:`tasks` makes the latter for a bar.
- Piped tables keep their natural width (the consoles in :mod:`fusionkit.cli.main`), and
  :func:`table_title` keeps a title holding a long run path on one line.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

REFRESH_PER_SECOND = 4  # redraws per second, whatever the number of batches

Advance = Callable[[int], None]
StartTask = Callable[[str, int], Advance]


def progress_bar(console: Console, show: bool = True) -> Progress:
    """A progress display on ``console`` (use as a context manager); silent unless ``show`` and the
    console is a terminal (``FORCE_COLOR=1`` or ``TTY_COMPATIBLE=1`` make rich treat a pipe as one)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, refresh_per_second=REFRESH_PER_SECOND,
                    disable=not (show and console.is_terminal))


def tasks(bar: Progress) -> StartTask:
    """``start(description, total)`` adds a bar line and returns the function that advances it."""

    def start(description: str, total: int) -> Advance:
        task = bar.add_task(description, total=total)
        return lambda n=1: bar.advance(task, n)

    return start


def table_title(title: str) -> Text:
    """A table title that is never wrapped to the table's width, so a run path in it stays whole
    (left-aligned: rich cannot centre a line it may not cut). Text, not markup: ``runs/[a]`` is a path."""
    return Text(title, style="table.title", justify="left", no_wrap=True, overflow="ignore")
