"""`plan-node start`: every stage not yet done, publish, pull and verify the pool, then the SuperNode,
pulling the pool again every coordinator.pull_every_s while it runs: the ClientApp's rounds only
read the verified pool (node/federation/rounds.py), they never reach the network.

With synth.cvae.federated (the federation trains the CVAE across sites) only ingest, train and
local_only run before the SuperNode joins: the site synthesizes, audits and publishes once the
federated CVAE's final decoder reaches it (node.cvae.federated, from the ClientApp). A site that
already holds that decoder (restarted after the CVAE run) synthesizes and publishes first, as usual.
"""

from __future__ import annotations

import time
from typing import Callable

from common import errors
from common.bundle import BundleError
from common.procs import stop
from node.doctor import check_site, exit_code
from node.federation.supernode import start_supernode
from node.release.exchange_client import ExchangeError
from node.release.publish import publish
from node.release.pull import pull
from node.routes import site_route
from node.site.workspace import Workspace
from node.stages import run_one, run_pipeline


def start_node(ws: Workspace, *, say: Callable[[str], None] = print) -> int:
    """Run the site until its SuperNode exits (or the process is interrupted); returns its exit
    code, or the code of the first failure `plan-node doctor` finds before any training."""
    code = preflight(ws, say=say)
    if code:
        return code
    cfg, route = ws.config(), site_route(ws)
    route.fetch_assets(ws, say=say)
    if route.awaits_federation(ws):
        run_pipeline(ws, upto="train")
        run_one(ws, "local_only")
        say(f"{cfg.name}: local {route.name} models trained; synthesis waits for the federated run")
    else:
        run_pipeline(ws)
        bundle_id = publish(ws)
        say(
            f"{cfg.name}: published bundle {bundle_id}"
            if bundle_id
            else f"{cfg.name}: nothing published (see the audit report)"
        )
    pulled = pull(ws)
    say(f"{cfg.name}: pool: {len(pulled)} new verified bundle(s)")
    say(f"{cfg.name}: SuperNode connecting to {cfg.coordinator.superlink}")
    return _join(ws, say=say)


def preflight(ws: Workspace, *, say: Callable[[str], None] = print) -> int:
    """`plan-node doctor`'s checks, before any training: prints what is not ok and returns the
    exit code of the first failure (0: go on). An unreachable coordinator is only reported: it may
    start after the site, which trains for minutes before it needs it (publishing then fails with
    its own error). A certificate that does not fit the coordinator's name is a failure."""
    checks = check_site(ws, network=True)
    failures = []
    for c in checks:
        if c.status == "ok":
            continue
        if c.status == "fail" and c.exit_code == errors.NETWORK:
            say(f"doctor: {c.name} not reachable yet; going on (the site needs it after training): {c.detail}")
            continue
        if c.status == "fail":
            failures.append(c)
        say(f"doctor: {c.status} {c.name}: {c.detail}")
    if failures:
        say(f"{ws.root}: not started: fix the failures above (`plan-node doctor --site-dir {ws.root}` checks again)")
    return exit_code(failures)


# Flower's SuperLink counts a node online until two heartbeat intervals (2 x 30 s) after its last
# heartbeat, and refuses to activate an online node: a site restarted within that minute is
# turned away once. So a refused activation is retried for a while before it counts as fatal.
JOIN_RETRY_S = 150
JOIN_RETRY_EVERY_S = 10


def _join(ws: Workspace, *, say: Callable[[str], None]) -> int:
    """Run the SuperNode until it exits; retry it while the SuperLink refuses to activate it."""
    log = ws.root / "logs" / "supernode.log"
    deadline = time.monotonic() + JOIN_RETRY_S
    while True:
        offset = log.stat().st_size if log.exists() else 0
        supernode = start_supernode(ws, log=log)
        try:
            code = _serve(ws, supernode, say=say)
        finally:
            stop(supernode)
        with open(log, "rb") as f:
            f.seek(offset)
            refused = b"Failed to activate SuperNode" in f.read()
        if code == 0 or not refused or time.monotonic() > deadline:
            if refused:
                say(
                    f"the SuperLink refused to activate this SuperNode for {JOIN_RETRY_S} s: is {ws.node_pub} "
                    "registered at the coordinator (plan-server kit or sites add)? See logs/supernode.log"
                )
            return code
        say(
            f"the SuperLink refused to activate this SuperNode (a session of it from under a minute ago may "
            f"still count as online); retrying in {JOIN_RETRY_EVERY_S} s"
        )
        time.sleep(JOIN_RETRY_EVERY_S)


def _serve(ws: Workspace, supernode, *, say: Callable[[str], None]) -> int:
    """Wait for the SuperNode to exit, pulling the pool every coordinator.pull_every_s meanwhile;
    returns its exit code. A failed pull is reported once (until its reason changes) and tried
    again: the coordinator may be restarting, and the rounds wait for the bundles they name."""
    every = ws.config().coordinator.pull_every_s
    next_pull, last_error = time.monotonic() + every, None
    while (code := supernode.poll()) is None:
        if time.monotonic() >= next_pull:
            try:
                pulled, error = pull(ws), None
                if pulled:
                    say(f"{ws.config().name}: pool: {len(pulled)} new verified bundle(s)")
            except (ExchangeError, BundleError, OSError) as e:
                error = f"{type(e).__name__}: {e}"
                if error != last_error:
                    say(f"{ws.config().name}: pulling the pool failed (trying again every {every:g} s): {error}")
            last_error = error
            next_pull = time.monotonic() + every
        time.sleep(0.2)
    return code
