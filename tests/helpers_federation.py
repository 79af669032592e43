"""A whole local federation for the slow end-to-end tests (deploy.local.launcher, real processes)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from deploy.local import launcher


def wait_until(predicate, timeout: float, what: str, *, every: float = 1.0) -> None:
    """Poll `predicate` until it is true; fail the test naming `what` after `timeout` seconds."""
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def require_cli() -> None:
    """Skip the test when plan-node and plan-server are not installed beside this Python."""
    if shutil.which("plan-node", path=str(Path(launcher._cli("plan-node")).parent)) is None:
        pytest.skip("plan-node is not installed in this environment; run `make test`")


def run_federation(
    root: Path, *, n_sites: int, quorum: int, federation_overrides: dict
) -> tuple[Path, list[Path], dict]:
    """Set up a coordinator and `n_sites` phantom sites under `root`, run the federation to its
    end and return (coordinator dir, site dirs, the run's results). Skips the test when the
    command-line tools are not installed (run `make test`)."""
    require_cli()
    coord, sites = launcher.setup(root, n_sites=n_sites, quorum=quorum, federation_overrides=federation_overrides)
    return coord, sites, launcher.run(coord, sites, timeout=1500)
