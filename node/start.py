"""`plan-node start`: every stage not yet done, publish, pull and verify the pool, then the SuperNode."""

from __future__ import annotations

from typing import Callable

from common.procs import stop
from node.publish import publish
from node.pull import pull
from node.stages import run_pipeline
from node.supernode import start_supernode
from node.workspace import Workspace


def start_node(ws: Workspace, *, say: Callable[[str], None] = print) -> int:
    """Run the site until its SuperNode exits (or the process is interrupted); returns its exit code."""
    cfg = ws.config()
    run_pipeline(ws)
    bundle_id = publish(ws)
    say(f"{cfg.name}: published bundle {bundle_id}" if bundle_id else f"{cfg.name}: nothing published (see the audit report)")
    pulled = pull(ws)
    say(f"{cfg.name}: pool: {len(pulled)} new verified bundle(s)")
    supernode = start_supernode(ws, log=ws.root / "logs" / "supernode.log")
    say(f"{cfg.name}: SuperNode connecting to {cfg.coordinator.superlink}")
    try:
        return supernode.wait()
    finally:
        stop(supernode)
