"""The coordinator's side of Flower: a TLS SuperLink process on loopback, signed run submission with
`flwr run`, polling.

The SuperLink listens on 127.0.0.1 only; SuperNodes reach it through the Fleet gateway
(server/fleet_gateway.py), the operator's `flwr` CLI and the ServerApp directly.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

from common.fabsign import sign_fab
from common.fileio import atomic_write_json
from common.flower import FlowerError, flower_bin, flower_env, flwr_json, write_connection
from common.procs import spawn
from common.signing import load_private_key

CONNECTION = "plan"
FLOWER_APP = Path(__file__).parent / "flower_app"


LOOPBACK = "127.0.0.1"


def start_superlink(
    *, flwr_home: Path, port: int, ca_cert: Path, cert: Path, key: Path, database: Path, log: Path
) -> subprocess.Popen:
    """Start `flower-superlink` with TLS on 127.0.0.1:port. Its Control API has no account
    authentication in open-source flwr, so it must never listen beyond loopback: SuperNodes come
    in through the Fleet gateway."""
    write_connection(flwr_home, CONNECTION, f"{LOOPBACK}:{port}", ca_cert)
    cmd = [
        flower_bin("flower-superlink"),
        "--ssl-ca-certfile",
        str(ca_cert),
        "--ssl-certfile",
        str(cert),
        "--ssl-keyfile",
        str(key),
        "--database",
        str(database),
        # Only SuperNodes whose public key the coordinator registered may join.
        "--enable-supernode-auth",
        # Offline sites: never `uv sync` an app's dependencies; they are installed with plan-node.
        "--disable-runtime-dependency-installation",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
    ]
    return spawn(cmd, log=log, env=flower_env(flwr_home))


def online_nodes(flwr_home: Path, *, since: float | None = None) -> int:
    """How many SuperNodes the SuperLink sees online; 0 while it is not answering yet.

    since (a time.time()): count only nodes activated after it. A SuperLink restarted on its
    database still lists the nodes of its previous life as online until their heartbeats
    expire (up to a minute); a run sent to them would lose its first round."""
    try:
        nodes = flwr_json(["supernode", "list", CONNECTION], flwr_home=flwr_home, timeout=30).get("nodes", [])
    except (FlowerError, subprocess.TimeoutExpired):
        return 0
    max_elapsed = float("inf") if since is None else time.time() - since
    return sum(1 for n in nodes if n.get("status") == "online" and float(n.get("online-elapsed") or 0) <= max_elapsed)


def wait_superlink(flwr_home: Path, proc: subprocess.Popen, *, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise FlowerError(f"flower-superlink exited with code {proc.returncode}; see its log")
        try:
            flwr_json(["ls", CONNECTION], flwr_home=flwr_home, timeout=30)
            return
        except (FlowerError, subprocess.TimeoutExpired):
            time.sleep(1)
    raise FlowerError(f"flower-superlink did not answer within {timeout:.0f} s")


def register_node(flwr_home: Path, public_key: Path, *, name: str) -> str | None:
    """Register a SuperNode's public key; returns its node id, or None if it was registered before."""
    try:
        data = flwr_json(["supernode", "register", str(public_key), CONNECTION, "--name", name], flwr_home=flwr_home)
    except FlowerError as e:
        if "already in use" in str(e):  # registrations persist in the SuperLink's database
            return None
        raise
    return str(data["node-id"])


def unregister_node(flwr_home: Path, node_id: str) -> None:
    """Remove a SuperNode's registration; it can no longer activate or pull messages."""
    flwr_json(["supernode", "unregister", str(node_id), CONNECTION], flwr_home=flwr_home)


def sign_app(app_dir: Path, *, key: Path, signatures: Path) -> str:
    """Build the FAB `flwr run` will submit from `app_dir`, sign it with the coordinator's key and
    store the verifications as `signatures/<sha256>.json` for the Fleet gateway; returns the sha256.

    FABs are built reproducibly (fixed zip dates), so this is the FAB the SuperLink will hold."""
    fab = build_fab_from_disk(Path(app_dir))
    digest = hashlib.sha256(fab).hexdigest()
    atomic_write_json(Path(signatures) / f"{digest}.json", sign_fab(fab, load_private_key(key)))
    return digest


def fab_verifications(signatures: Path):
    """For the Fleet gateway: sha256 hex -> the stored verifications, or None when the coordinator never signed it."""

    def lookup(digest: str) -> dict[str, str] | None:
        path = Path(signatures) / f"{digest}.json"
        return json.loads(path.read_text()) if len(digest) == 64 and digest.isalnum() and path.is_file() else None

    return lookup


def submit_run(
    flwr_home: Path, *, run_config: dict[str, str], key: Path, signatures: Path, app: Path = FLOWER_APP
) -> str:
    """Sign and submit a Flower App (by default plan-node's); returns the run id."""
    sign_app(app, key=key, signatures=signatures)
    overrides = " ".join(f'{k}="{v}"' for k, v in run_config.items())
    data = flwr_json(["run", str(app), CONNECTION, "--run-config", overrides], flwr_home=flwr_home)
    return str(data["run-id"])


def run_status(flwr_home: Path, run_id: str) -> str:
    runs = flwr_json(["ls", CONNECTION, "--run-id", run_id], flwr_home=flwr_home).get("runs", [])
    return str(runs[0]["status"]) if runs else "unknown"


def wait_run(flwr_home: Path, run_id: str, *, timeout: float, poll: float = 3.0) -> str:
    """Poll until the run is finished; returns its final status (e.g. `finished:completed`).

    A ClientApp exception does not fail a Flower run, so callers check the metrics, not only this.
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = run_status(flwr_home, run_id)
        if status.startswith("finished"):
            return status
        time.sleep(poll)
    raise FlowerError(f"run {run_id} did not finish within {timeout:.0f} s")
