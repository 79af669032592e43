"""The coordinator's side of Flower: a TLS SuperLink process, run submission with `flwr run`, polling."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from common.flower import FlowerError, flower_bin, flower_env, flwr_json, write_connection
from common.procs import spawn

CONNECTION = "plan"
FLOWER_APP = Path(__file__).parent / "flower_app"


def start_superlink(*, flwr_home: Path, host: str, port: int, ca_cert: Path, cert: Path, key: Path, database: Path, log: Path) -> subprocess.Popen:
    """Start `flower-superlink` with TLS on host:port (SuperNodes, the flwr CLI and ServerApps share it)."""
    write_connection(flwr_home, CONNECTION, f"{host}:{port}", ca_cert)
    cmd = [
        flower_bin("flower-superlink"),
        "--ssl-ca-certfile", str(ca_cert),
        "--ssl-certfile", str(cert),
        "--ssl-keyfile", str(key),
        "--database", str(database),
        # Only SuperNodes whose public key the coordinator registered may join.
        "--enable-supernode-auth",
        # Offline sites: never `uv sync` an app's dependencies; they are installed with plan-node.
        "--disable-runtime-dependency-installation",
        "--host", host,
        "--port", str(port),
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


def submit_run(flwr_home: Path, *, run_config: dict[str, str]) -> str:
    """Submit the plan-node Flower App; returns the run id."""
    overrides = " ".join(f'{k}="{v}"' for k, v in run_config.items())
    data = flwr_json(["run", str(FLOWER_APP), CONNECTION, "--run-config", overrides], flwr_home=flwr_home)
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
