"""`plan-node doctor`: each check fails on what it checks, with the exit code of its kind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from common import errors
from deploy.local.launcher import free_ports
from node.cli import app as node_app
from node.doctor import check_site, exit_code
from node.site.workspace import Workspace
from server.cli import app as server_app

runner = CliRunner()


def _init(tmp_path, *args) -> Workspace:
    r = runner.invoke(node_app, ["init", "--site-dir", str(tmp_path / "site"), "--name", "st-marys", *map(str, args)])
    assert r.exit_code == 0, r.output
    return Workspace(tmp_path / "site")


def _by_name(checks) -> dict:
    return {c.name: c for c in checks}


def test_a_fresh_phantom_site_passes_with_a_warning_for_the_missing_kit(tmp_path):
    ws = _init(tmp_path)
    r = runner.invoke(node_app, ["doctor", "--site-dir", str(ws.root), "--json"])
    assert r.exit_code == 0, r.output
    checks = {c["name"]: c for c in json.loads(r.output)}
    assert checks["kit"]["status"] == "warn" and "--kit" in checks["kit"]["detail"]
    assert {checks[k]["status"] for k in ("config", "data", "keys", "disk", "gpu")} == {"ok"}


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a GPU of index 7")
def test_a_gpu_index_the_machine_lacks_is_named(tmp_path):
    ws = _init(tmp_path)
    ws.config_path.write_text(ws.config_path.read_text().replace("device: auto", "device: cuda:7"))
    gpu = _by_name(check_site(ws))["gpu"]
    assert gpu.status == "fail" and "'cuda:7'" in gpu.detail and "CUDA device(s)" in gpu.detail


def test_open_keys_bad_labels_and_single_image_patients_are_named(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "scans.npz",
        images=rng.integers(0, 256, (40, 16, 16), dtype=np.uint8),
        labels=np.array([0, 1, 2, 5] * 10),
    )
    ws = _init(tmp_path, "--source", "npz", "--data-path", tmp_path / "scans.npz")
    cfg = yaml.safe_load(ws.config_path.read_text())
    cfg["data"]["n_classes"] = 3
    ws.config_path.write_text(yaml.safe_dump(cfg))
    ws.signing_key.chmod(0o644)
    checks = _by_name(check_site(ws, network=False))
    assert (
        checks["keys"].status == "fail"
        and "chmod 600" in checks["keys"].detail
        and checks["keys"].exit_code == errors.CONFIG
    )
    assert (
        checks["schema"].status == "fail"
        and "labels outside this federation's 3 classes (0..2), the first at image 3 with label 5"
        in checks["schema"].detail
    )
    assert checks["patients"].status == "warn" and "splits are by image" in checks["patients"].detail
    assert exit_code(list(checks.values())) in (errors.CONFIG, errors.DATA)


def _site_with_kit(tmp_path, exchange: int, superlink: int) -> Workspace:
    """A phantom site with a kit that points at these loopback ports."""
    coord = tmp_path / "coord"
    assert runner.invoke(server_app, ["init", "--dir", str(coord)]).exit_code == 0
    ws = _init(tmp_path)
    kit = tmp_path / "kit.tar"
    args = ["kit", "st-marys", "--key", str(ws.signing_pub), "--dir", str(coord), "--out", str(kit)]
    args += ["--exchange", f"127.0.0.1:{exchange}", "--superlink", f"127.0.0.1:{superlink}"]
    r = runner.invoke(server_app, args)
    assert r.exit_code == 0, r.output
    assert runner.invoke(node_app, ["init", "--site-dir", str(ws.root), "--kit", str(kit)]).exit_code == 0
    return ws


def test_a_coordinator_that_is_down_is_a_network_failure(tmp_path):
    exchange, superlink = free_ports(2)  # nobody listens there
    ws = _site_with_kit(tmp_path, exchange, superlink)
    checks = _by_name(check_site(ws, timeout_s=2))
    assert checks["certificate"].status == "ok"
    for name, port in (("exchange", exchange), ("superlink", superlink)):
        assert checks[name].status == "fail" and f"127.0.0.1:{port}: not reachable" in checks[name].detail
    r = runner.invoke(node_app, ["doctor", "--site-dir", str(ws.root)])
    assert r.exit_code == errors.NETWORK and "is the coordinator up" in r.output


def test_a_live_exchange_is_reached_with_mutual_tls_and_a_certificate_for_another_name_is_a_config_failure(tmp_path):
    import socket
    import ssl
    import threading

    from common.tls import issue_client_cert, issue_server_cert, make_ca
    from node.doctor import _reach
    from tests.helpers_exchange import live_exchange

    with live_exchange(tmp_path / "coord", client_ca=True) as ex:
        crt, key = issue_client_cert(ex.cd.ca_dir, tmp_path / "keys", "a")
        ok = _reach("exchange", ex.address, (ex.ca_cert, crt, key), timeout_s=5, client_cert=True)
        assert ok.status == "ok", ok

    # a coordinator whose certificate covers only coord.example, dialled as 127.0.0.1
    make_ca(tmp_path / "ca", "fed")
    srv_crt, srv_key = issue_server_cert(tmp_path / "ca", tmp_path / "srv", ["coord.example"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(srv_crt, srv_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_one():
        conn, _ = listener.accept()
        try:
            ctx.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            conn.close()

    t = threading.Thread(target=serve_one, daemon=True)
    t.start()
    wrong = _reach(
        "superlink", f"127.0.0.1:{port}", (tmp_path / "ca" / "ca.crt", None, None), timeout_s=5, client_cert=False
    )
    t.join(5)
    listener.close()
    assert wrong.status == "fail" and wrong.exit_code == errors.CONFIG, wrong
    assert "plan-server ca init --host 127.0.0.1" in wrong.detail, wrong


def test_start_runs_the_doctor_first(tmp_path, monkeypatch):
    """A failure stops `plan-node start` before any training, with the failure's exit code; a
    coordinator that does not answer yet is reported and the site goes on to train."""
    import node.start

    class Trained(Exception):
        pass

    def train_here(ws, **kw):
        raise Trained

    monkeypatch.setattr(node.start, "run_pipeline", train_here)
    ws = _site_with_kit(tmp_path, *free_ports(2))  # nobody listens there
    said = []
    with pytest.raises(Trained):
        node.start.start_node(ws, say=said.append)
    assert any(m.startswith("doctor: exchange not reachable yet; going on") for m in said), said

    ws.signing_key.chmod(0o644)
    said.clear()
    assert node.start.start_node(ws, say=said.append) == errors.CONFIG  # returned: run_pipeline never ran
    assert any(m.startswith("doctor: fail keys") and "chmod 600" in m for m in said), said
    assert "not started" in said[-1]
