"""The Flower control plane, with real processes: a TLS SuperLink on loopback, the coordinator's
Fleet gateway on the public port, SuperNodes started as a site starts them.

What an outsider who holds the (public) CA certificate can do at the public port: nothing. The
flwr CLI gets no Control API there, a SuperNode whose key was never registered is refused, and a
site that was revoked is refused and unregistered. What reaches a SuperNode runs only when the
coordinator signed it (`--trusted-entities`)."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import httpx
import pytest
import yaml

from common.config import FederationConfig
from common.fabsign import trusted_entities
from common.flower import FlowerError, flower_bin, flower_env, flwr_json, write_connection
from common.nodekey import generate_node_key
from common.procs import spawn, stop
from common.signing import load_public_key
from deploy.local.launcher import free_ports
from server import federation
from server.coordinator import init_coordinator, start_gateway
from server.nodes import register_nodes, revoke_node
from tests.helpers_federation import wait_until

pytestmark = pytest.mark.slow

ECHO_APP = Path(__file__).parent / "echo_app"


def _supernode(cd, fed, tmp_path, name: str, *, port: int):
    """A SuperNode as node/federation/supernode.py starts one: through the gateway, trusting only the
    coordinator's key."""
    trusted = tmp_path / name / "trusted_entities.yaml"
    trusted.parent.mkdir(parents=True, exist_ok=True)
    trusted.write_text(yaml.safe_dump(trusted_entities(load_public_key(cd.coordinator_pub))))
    log = tmp_path / "logs" / f"{name}.log"
    cmd = [
        flower_bin("flower-supernode"), "--superlink", f"127.0.0.1:{fed.superlink_port}",
        "--root-certificates", str(cd.ca_cert), "--port", str(port),
        "--auth-supernode-private-key", str(tmp_path / f"{name}.key"), "--trusted-entities", str(trusted),
        "--max-retries", "2",
    ]  # fmt: skip
    return spawn(cmd, log=log, env=flower_env(tmp_path / name / ".flwr")), log


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    """A coordinator's SuperLink and gateway with one registered site (`good`) online."""
    tmp_path = tmp_path_factory.mktemp("plane")
    public, internal, exchange, good_port, rogue_port, revoked_port = free_ports(6)
    fed = FederationConfig(superlink_port=public, superlink_internal_port=internal, exchange_port=exchange)
    cd = init_coordinator(tmp_path / "coord", fed)
    for name in ("good", "rogue", "gone"):
        generate_node_key(tmp_path / f"{name}.key", tmp_path / f"{name}.pub")
    cd.add_node_key("good", (tmp_path / "good.pub").read_text().strip())
    cd.add_node_key("gone", (tmp_path / "gone.pub").read_text().strip())
    superlink = federation.start_superlink(
        flwr_home=cd.flwr_home, port=internal, ca_cert=cd.ca_cert, cert=cd.tls_dir / "server.crt",
        key=cd.tls_dir / "server.key", database=cd.root / "superlink.db", log=tmp_path / "logs" / "superlink.log",
    )  # fmt: skip
    procs, gateway = [superlink], None
    try:
        federation.wait_superlink(cd.flwr_home, superlink)
        register_nodes(cd, lambda _: None)
        gateway = start_gateway(cd, fed)
        good, good_log = _supernode(cd, fed, tmp_path, "good", port=good_port)
        procs.append(good)
        wait_until(lambda: federation.online_nodes(cd.flwr_home) >= 1, 90, "the registered SuperNode to come online")
        yield {"cd": cd, "fed": fed, "tmp": tmp_path, "good": good, "good_log": good_log,
               "ports": {"rogue": rogue_port, "gone": revoked_port}, "procs": procs}  # fmt: skip
    finally:
        if gateway is not None:
            gateway.stop()
        for p in procs:
            stop(p)


def test_the_public_port_offers_no_control_api(plane):
    cd, fed, tmp = plane["cd"], plane["fed"], plane["tmp"]
    # The outsider's own flwr CLI, pointed at the public address with the federation's CA.
    outsider = tmp / "outsider" / ".flwr"
    write_connection(outsider, "public", f"127.0.0.1:{fed.superlink_port}", cd.ca_cert)
    for args in (["ls", "public"], ["supernode", "list", "public"], ["stop", "1", "public"],
                 ["supernode", "register", str(tmp / "rogue.pub"), "public"],
                 ["run", str(ECHO_APP), "public"]):  # fmt: skip
        with pytest.raises(FlowerError):
            flwr_json(args, flwr_home=outsider, cwd=tmp)
    context = ssl.create_default_context(cafile=str(cd.ca_cert))
    with httpx.Client(base_url=f"https://127.0.0.1:{fed.superlink_port}", verify=context) as client:
        for path in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/fleet/register-node"):
            assert client.post(path, content=b"").status_code == 403, path
        assert client.get("/docs").status_code == 403
        assert client.post("/v1/fleet/activate-node", content=b"").status_code == 401
    # The same calls at the loopback SuperLink are the operator's: the rogue key was not registered.
    nodes = flwr_json(["supernode", "list", federation.CONNECTION], flwr_home=cd.flwr_home)["nodes"]
    assert len(nodes) == 2  # good and gone; never rogue
    assert "only registered SuperNodes" in (cd.root / "logs" / "gateway.log").read_text()


def test_an_unregistered_supernode_is_refused_at_the_gateway(plane):
    cd, fed, tmp = plane["cd"], plane["fed"], plane["tmp"]
    rogue, log = _supernode(cd, fed, tmp, "rogue", port=plane["ports"]["rogue"])
    plane["procs"].append(rogue)
    assert rogue.wait(timeout=90) != 0
    assert "not a registered SuperNode key" in log.read_text()  # the SuperNode says why
    assert "not a registered SuperNode key" in (cd.root / "logs" / "gateway.log").read_text()


def test_only_apps_signed_by_the_coordinator_run_at_a_site(plane):
    cd, tmp = plane["cd"], plane["tmp"]
    # Unsigned (submitted at the loopback Control API without the coordinator's signature, as a
    # compromised SuperLink or an operator's mistake would): the site refuses to run it.
    out = tmp / "unsigned.txt"
    run_id = flwr_json(["run", str(ECHO_APP), federation.CONNECTION, "--run-config", f'out="{out}"'],
                       flwr_home=cd.flwr_home)["run-id"]  # fmt: skip
    wait_until(
        lambda: "could not be verified" in plane["good_log"].read_text(),
        120,
        "the SuperNode to refuse the unsigned app",
    )
    wait_until(
        lambda: federation.run_status(cd.flwr_home, str(run_id)).startswith("finished"), 120, "the unsigned run to end"
    )
    assert out.read_text().split() == ["1", "0"]  # asked one node; no answer
    # Signed by the coordinator: the same app runs.
    out = tmp / "signed.txt"
    run_id = federation.submit_run(cd.flwr_home, run_config={"out": str(out)}, key=cd.coordinator_key,
                                   signatures=cd.fab_signatures, app=ECHO_APP)  # fmt: skip
    assert federation.wait_run(cd.flwr_home, run_id, timeout=180) == "finished:completed"
    assert out.read_text().split() == ["1", "1"]
    assert plane["good"].poll() is None


def test_a_revoked_site_is_refused_and_unregistered(plane):
    cd, fed, tmp = plane["cd"], plane["fed"], plane["tmp"]
    names = json.loads((cd.node_keys / "nodes.json").read_text())
    (gone_id,) = [node_id for node_id, name in names.items() if name == "gone"]
    assert "unregistered" in revoke_node(cd, "gone")
    status = {n["node-id"]: n["status"] for n in flwr_json(
        ["supernode", "list", federation.CONNECTION], flwr_home=cd.flwr_home)["nodes"]}  # fmt: skip
    assert status[gone_id] == "unregistered" and "online" in status.values()
    gone, log = _supernode(cd, fed, tmp, "gone", port=plane["ports"]["gone"])
    plane["procs"].append(gone)
    assert gone.wait(timeout=90) != 0
    assert "unknown or revoked" in log.read_text()
    with pytest.raises(ValueError, match="revoked"):
        cd.add_node_key("gone", (tmp / "gone.pub").read_text().strip())
    assert plane["good"].poll() is None  # the others carry on
