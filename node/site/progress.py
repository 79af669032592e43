"""Progress of long loops: a rich bar on a terminal; otherwise (a service, a pipe, CI) a log line
every HEARTBEAT_S seconds and at the end, with rate and ETA, so a 20,000-step run without a
terminal is not silent."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

HEARTBEAT_S = 30.0
log = logging.getLogger(__name__)


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def heartbeat_line(description: str, done: int, total: int, elapsed_s: float, since: int, info: str = "") -> str:
    """`walk: 120/600 (20%), 3.1/s, ETA 2m35s, loss 0.3`; the rate counts the steps of this run
    (`done - since`: a resumed loop does not claim its earlier steps)."""
    rate = (done - since) / elapsed_s if elapsed_s > 0 else 0.0
    eta = f", ETA {_duration((total - done) / rate)}" if rate > 0 and done < total else ""
    pct = f" ({100 * done / total:.0f}%)" if total else ""
    return f"{description}: {done}/{total}{pct}, {rate:.3g}/s{eta}" + (f", {info}" if info else "")


@contextmanager
def progress(description: str, *, total: int, completed: int = 0, heartbeat_s: float = HEARTBEAT_S) -> Iterator:
    """Yields `update(advance=1, **fields)`; e.g. `update(1, info="loss 0.3")`."""
    tty = sys.stderr.isatty()
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        disable=not tty,
        transient=False,
    )
    state = {"done": completed, "info": "", "last": time.monotonic()}
    start = state["last"]
    with bar:
        task = bar.add_task(description, total=total, completed=completed, info="")

        def update(advance: int = 1, **fields) -> None:
            bar.update(task, advance=advance, **fields)
            state["done"] += advance
            state["info"] = fields.get("info", state["info"])
            now = time.monotonic()
            if not tty and now - state["last"] >= heartbeat_s:
                state["last"] = now
                log.info(heartbeat_line(description, state["done"], total, now - start, completed, state["info"]))

        yield update
    if not tty and time.monotonic() - start >= heartbeat_s:  # short loops (a federated round's epochs) stay quiet
        log.info(
            heartbeat_line(description, state["done"], total, time.monotonic() - start, completed, state["info"])
            + " done"
        )
