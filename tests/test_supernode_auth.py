"""SuperNode authentication on a real TLS SuperLink: a registered node joins, an unregistered one is refused."""

from __future__ import annotations

import time

import pytest

from common.config import FederationConfig
from common.flower import flower_bin, flower_env
from common.nodekey import generate_node_key
from common.procs import spawn, stop
from deploy.local.launcher import free_ports
from server import federation
from server.coordinator import init_coordinator

pytestmark = pytest.mark.slow


def _supernode(cd, port: int, superlink_port: int, key, log):
    cmd = [
        flower_bin("flower-supernode"), "--superlink", f"127.0.0.1:{superlink_port}",
        "--root-certificates", str(cd.ca_cert), "--port", str(port), "--auth-supernode-private-key", str(key),
        "--max-retries", "2",
    ]  # fmt: skip
    return spawn(cmd, log=log, env=flower_env(log.parent / ".flwr"))


def test_unregistered_supernode_is_refused(tmp_path):
    superlink_port, exchange_port, good_port, rogue_port = free_ports(4)
    cd = init_coordinator(tmp_path / "coord", FederationConfig(superlink_port=superlink_port, exchange_port=exchange_port))
    generate_node_key(tmp_path / "good.key", tmp_path / "good.pub")
    generate_node_key(tmp_path / "rogue.key", tmp_path / "rogue.pub")
    superlink = federation.start_superlink(
        flwr_home=cd.flwr_home, host="127.0.0.1", port=superlink_port, ca_cert=cd.ca_cert,
        cert=cd.tls_dir / "server.crt", key=cd.tls_dir / "server.key", database=cd.root / "superlink.db",
        log=tmp_path / "logs" / "superlink.log",
    )  # fmt: skip
    procs = []
    try:
        federation.wait_superlink(cd.flwr_home, superlink)
        assert federation.register_node(cd.flwr_home, tmp_path / "good.pub", name="good") is not None
        assert federation.register_node(cd.flwr_home, tmp_path / "good.pub", name="good") is None  # idempotent
        procs.append(good := _supernode(cd, good_port, superlink_port, tmp_path / "good.key", tmp_path / "logs" / "good.log"))
        procs.append(rogue := _supernode(cd, rogue_port, superlink_port, tmp_path / "rogue.key", tmp_path / "logs" / "rogue.log"))
        assert rogue.wait(timeout=90) != 0
        # Refused for its key, not for a connection problem: the SuperLink names the cause.
        assert "Failed to activate SuperNode" in (tmp_path / "logs" / "rogue.log").read_text()
        assert "No SuperNode found with the given public key" in (tmp_path / "logs" / "superlink.log").read_text()
        deadline = time.time() + 60
        while federation.online_nodes(cd.flwr_home) < 1 and time.time() < deadline:
            time.sleep(1)
        assert federation.online_nodes(cd.flwr_home) == 1
        assert good.poll() is None
    finally:
        for p in procs:
            stop(p)
        stop(superlink)
