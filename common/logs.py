"""Logging for every process: timestamped lines through the standard library.

On a terminal, rich's handler (colours, aligned); otherwise (a service, a pipe, CI) plain lines
`2026-12-02 18:00:00,123 INFO node.plan.walk: ...` that a log collector can parse. `--log-file PATH`
adds the same plain lines to a file. Long loops (node/site/progress.py) log a heartbeat with rate and
ETA when no terminal shows their progress bar.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(*, log_file: Path | None = None, debug: bool = False) -> None:
    """Configure the root logger once per process (a second call replaces the handlers)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        root.addHandler(RichHandler(show_path=False, markup=False, rich_tracebacks=False))
    else:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter(PLAIN))
        root.addHandler(h)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        f = logging.FileHandler(log_file, encoding="utf-8")
        f.setFormatter(logging.Formatter(PLAIN))
        root.addHandler(f)
    for noisy in ("urllib3", "httpx", "httpcore", "PIL", "matplotlib", "grpc"):  # their debug lines are not ours
        logging.getLogger(noisy).setLevel(logging.WARNING)
