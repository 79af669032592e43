"""Progress bars for long loops (rich); silent when stderr is not a terminal (logs, tests)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def progress(description: str, *, total: int, completed: int = 0) -> Iterator:
    """Yields `update(advance=1, **fields)`; e.g. `update(1, info="loss 0.3")`."""
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        disable=not sys.stderr.isatty(), transient=False,
    )
    with bar:
        task = bar.add_task(description, total=total, completed=completed, info="")

        def update(advance: int = 1, **fields) -> None:
            bar.update(task, advance=advance, **fields)

        yield update
