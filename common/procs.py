"""Child processes we start and must stop: Flower's SuperLink and SuperNodes, site and coordinator daemons."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path


def spawn(cmd: list[str], *, log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """Start `cmd` in its own process group with stdout and stderr appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        return subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True
        )


def stop(proc: subprocess.Popen, *, grace: float = 10.0) -> int | None:
    """SIGTERM the process's group, then SIGKILL after `grace` seconds. Returns its exit code."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=grace)


def exit_on_sigterm() -> None:
    """Make SIGTERM unwind through `finally` (exit code 143), so a daemon stops the child
    processes it started (a SuperLink, a SuperNode) instead of leaving them orphaned."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
