"""`plan-server start` stopped by SIGTERM (systemd, the launcher) takes its SuperLink with it."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import yaml

from common.procs import spawn, stop
from deploy.local.launcher import _cli, _run, free_ports
from tests.helpers_federation import require_cli, wait_until

pytestmark = pytest.mark.slow


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text`."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):  # a zombie's is empty
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue  # the process ended while we looked
    return pids


def test_sigterm_stops_the_coordinator_and_its_superlink(tmp_path):
    require_cli()
    coord = tmp_path / "coord"
    _run([_cli("plan-server"), "init", "--dir", str(coord)])
    exchange, public, internal = free_ports(3)
    fed_path = coord / "federation.yaml"
    fed = yaml.safe_load(fed_path.read_text())
    fed.update(exchange_port=exchange, superlink_port=public, superlink_internal_port=internal)
    fed_path.write_text(yaml.safe_dump(fed))
    log = tmp_path / "coordinator.log"
    proc = spawn([_cli("plan-server"), "start", "--dir", str(coord)], log=log)
    try:
        wait_until(lambda: "Fleet gateway listening" in log.read_text(), 120, "the coordinator to start")
        superlink_db = str(coord / "superlink.db")
        assert _processes_mentioning(superlink_db), "the SuperLink is not running"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
        wait_until(lambda: not _processes_mentioning(superlink_db), 30, "the SuperLink to stop")
    finally:
        stop(proc)
