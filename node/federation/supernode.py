"""A site's Flower SuperNode process: connects to the coordinator's Fleet gateway over TLS and runs
only Flower Apps signed by the coordinator's key (`--trusted-entities`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from common.fabsign import trusted_entities
from common.fileio import atomic_write_text
from common.flower import flower_bin, flower_env
from common.procs import spawn
from common.signing import load_public_key
from node.site.workspace import Workspace


def write_trusted_entities(ws: Workspace) -> Path:
    """`.flwr/trusted_entities.yaml` from the kit's coordinator key: the one signer whose apps this site runs."""
    path = ws.root / ".flwr" / "trusted_entities.yaml"
    coordinator_pub = load_public_key(ws.resolve(ws.config().coordinator.coordinator_pub))
    atomic_write_text(path, yaml.safe_dump(trusted_entities(coordinator_pub)))
    return path


def start_supernode(ws: Workspace, *, log: Path) -> subprocess.Popen:
    """Start `flower-supernode` for this site; its ClientApp reads the workspace at `site-dir`."""
    cfg = ws.config()
    cmd = [
        flower_bin("flower-supernode"),
        "--superlink",
        cfg.coordinator.superlink,
        "--root-certificates",
        str(ws.resolve(cfg.coordinator.ca_cert)),
        "--port",
        str(cfg.coordinator.supernode_port),
        "--auth-supernode-private-key",
        str(ws.node_key),
        "--trusted-entities",
        str(write_trusted_entities(ws)),
        "--node-config",
        f'site-dir="{ws.root.resolve()}"',
    ]
    return spawn(cmd, log=log, env=flower_env(ws.root / ".flwr"))
