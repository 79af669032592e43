"""A site's Flower SuperNode process: connects to the coordinator's SuperLink over TLS."""

from __future__ import annotations

import subprocess
from pathlib import Path

from common.flower import flower_bin, flower_env
from common.procs import spawn
from node.workspace import Workspace


def start_supernode(ws: Workspace, *, log: Path) -> subprocess.Popen:
    """Start `flower-supernode` for this site; its ClientApp reads the workspace at `site-dir`."""
    cfg = ws.config()
    cmd = [
        flower_bin("flower-supernode"),
        "--superlink", cfg.coordinator.superlink,
        "--root-certificates", str(ws.resolve(cfg.coordinator.ca_cert)),
        "--port", str(cfg.coordinator.supernode_port),
        "--auth-supernode-private-key", str(ws.node_key),
        "--node-config", f'site-dir="{ws.root.resolve()}"',
    ]
    return spawn(cmd, log=log, env=flower_env(ws.root / ".flwr"))
