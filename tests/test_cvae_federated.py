"""The federated CVAE (FederationConfig.cvae_federated): only the decoder is exchanged, FedAvg
averages decoders, each site's encoder stays local, and synthesis uses the federation's decoder.
Fast (no processes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.config import CvaeConfig, FederationConfig
from common.models import CVAE, state_sha256


def _cvae(seed: int) -> CVAE:
    torch.manual_seed(seed)
    return CVAE(16, 2, hidden=8, latent=4)


def test_decoder_state_holds_the_decoder_only():
    m = _cvae(0)
    state = m.decoder_state()
    assert state and all(k.startswith("decoder.") for k in state)
    assert set(state) == {f"decoder.{k}" for k in m.decoder.state_dict()}
    assert not any(k.startswith("encoder.") for k in state)
    other = _cvae(1)
    enc_before = {k: v.clone() for k, v in other.encoder.state_dict().items()}
    other.load_decoder_state(state)
    assert all(torch.equal(v, state[f"decoder.{k}"]) for k, v in other.decoder.state_dict().items())
    assert all(torch.equal(v, enc_before[k]) for k, v in other.encoder.state_dict().items())  # encoder untouched
    with pytest.raises(ValueError, match="decoder's keys"):
        other.load_decoder_state(m.state_dict())  # the whole model is not a decoder
    assert state_sha256(state) == state_sha256(_cvae(0).decoder_state()) != state_sha256(_cvae(1).decoder_state())


def test_fedavg_of_two_sites_decoders_is_their_weighted_mean():
    a, b = _cvae(0).decoder_state(), _cvae(1).decoder_state()
    replies = [
        RecordDict({"arrays": ArrayRecord(s), "metrics": MetricRecord({"num-examples": n})})
        for s, n in ((a, 30), (b, 10))
    ]
    avg = aggregate_arrayrecords(replies, "num-examples").to_torch_state_dict()  # what Flower's FedAvg aggregates with
    assert set(avg) == set(a)
    for k in a:
        torch.testing.assert_close(avg[k], (30 * a[k] + 10 * b[k]) / 40)


def test_server_decoder_matches_a_site_cvae_of_the_default_size():
    from server.serverapp import federated_cvae

    fed = FederationConfig(route="cvae", cvae_federated=True, n_classes=3)
    server = federated_cvae(fed)
    cc = CvaeConfig()
    site = CVAE(fed.extractor.dim, 3, hidden=cc.hidden, latent=cc.latent_dim)
    assert {k: v.shape for k, v in server.decoder_state().items()} == {
        k: v.shape for k, v in site.decoder_state().items()
    }
    assert state_sha256(server.decoder_state()) == state_sha256(
        federated_cvae(fed).decoder_state()
    )  # seeded: the same every run


def test_federated_and_dp_are_off_by_default_and_may_be_combined():
    assert FederationConfig().cvae_federated is False and CvaeConfig().federated is False and CvaeConfig().dp is False
    assert CvaeConfig(dp=True, federated=True).dp


def test_train_cvae_fixed_epochs_from_an_init():
    from node.cvae.generator import train_cvae

    rng = np.random.default_rng(0)
    y = np.arange(80) % 2
    x = (rng.normal(0, 1, (80, 16)) + 2 * y[:, None]).astype(np.float32)
    cfg = CvaeConfig(hidden=8, latent_dim=4, max_epochs=50, patience=1)
    init = _cvae(3)
    before = {k: v.clone() for k, v in init.state_dict().items()}
    r = train_cvae(x, y, n_classes=2, cfg=cfg, seed=0, device="cpu", init=init, epochs=4)
    assert r.epochs_trained == 4 and len(r.history) == 4 and not r.info["early_stopping"]
    assert r.best_val_loss == r.history[-1]["val_loss"] is not None
    assert all(torch.equal(v, before[k]) for k, v in init.state_dict().items())  # the init is copied, not trained
    assert not torch.equal(r.model.decoder[0].weight, init.decoder[0].weight)
    with pytest.raises(ValueError, match="for training with dp"):
        train_cvae(x, y, n_classes=2, cfg=cfg, seed=0, device="cpu", epochs=2, dp_plan_epochs=4)


@pytest.fixture
def federated_site(tiny_workspace):
    from common.config import commented_yaml, load_site_config
    from common.fileio import atomic_write_text
    from node.stages import run_pipeline

    ws = tiny_workspace
    cfg = load_site_config(ws.config_path)
    cfg.synth.route = "cvae"
    cfg.synth.cvae.max_epochs = 10
    cfg.synth.cvae.federated = True
    atomic_write_text(ws.config_path, commented_yaml(cfg, title="cvae, federated"))
    run_pipeline(ws, upto="train")
    return ws


def test_a_site_keeps_its_encoder_and_samples_from_the_federations_decoder(federated_site):
    from node.cvae import federated as cvae_federated
    from node.cvae.checkpoint import load_cvae
    from node.routes import site_route
    from node.stages import run_one

    ws = federated_site
    local = load_cvae(ws.models / "cvae.safetensors")
    # synthesis waits for the federation's decoder; plan-node start asks the route
    with pytest.raises(FileNotFoundError, match="the federated CVAE has not finished"):
        run_one(ws, "synthesize")
    assert site_route(ws).awaits_federation(ws)

    # round 1 starts from the site's own CVAE; only a decoder goes back
    server_init = CVAE(local.model.d_in, 2, hidden=local.model.hidden, latent=local.model.latent).decoder_state()
    dec1, n, train_loss, val_loss = cvae_federated.local_update(ws, server_init, server_round=1, epochs=2, rounds=2)
    assert set(dec1) == set(server_init) and n > 0 and np.isfinite(train_loss) and np.isfinite(val_loss)
    after1 = load_cvae(ws.models / "cvae_fed.safetensors").model
    assert all(torch.equal(v, dec1[k]) for k, v in after1.decoder_state().items())
    assert not torch.equal(after1.encoder[0].weight, local.model.encoder[0].weight)  # the encoder trained, here

    # a later round starts from the global decoder; the encoder continues from the site's last update
    rnd2 = {k: v + 0.01 for k, v in dec1.items()}
    dec2, *_ = cvae_federated.local_update(ws, rnd2, server_round=2, epochs=1, rounds=2)
    after2 = load_cvae(ws.models / "cvae_fed.safetensors").model
    assert not torch.equal(after2.encoder[0].weight, after1.encoder[0].weight)

    # a non-final global decoder does not unlock synthesis; the final one does
    cvae_federated.receive_global(ws, dec2, server_round=1, rounds=2)
    with pytest.raises(FileNotFoundError, match="has not finished"):
        run_one(ws, "synthesize")
    assert site_route(ws).awaits_federation(ws)
    got = cvae_federated.receive_global(ws, dec2, server_round=2, rounds=2, flower_run_id=7)
    assert not site_route(ws).awaits_federation(ws)  # a restarted site synthesizes and publishes first
    assert np.isfinite(got["val_loss"]) and got["global_decoder_sha256"] == state_sha256(dec2)
    glob = load_cvae(ws.models / "cvae_global.safetensors")
    assert all(torch.equal(v, dec2[k]) for k, v in glob.model.decoder_state().items())
    assert torch.equal(glob.model.encoder[0].weight, after2.encoder[0].weight)  # this site's encoder, not shipped
    assert torch.equal(glob.lo, local.lo) and torch.equal(glob.hi, local.hi)  # this site's scaler

    assert run_one(ws, "synthesize")
    run = json.loads((ws.synth / "latest.json").read_text())["run_id"]
    synth = json.loads((ws.synth / run / "synth.json").read_text())
    assert synth["decoder"]["source"] == "federation" and synth["decoder"]["global_decoder_sha256"] == state_sha256(
        dec2
    )
    assert synth["dp"] == {"enabled": False} and synth["dp_epsilon"] is None  # the block is there without dp too
    assert not run_one(ws, "synthesize")  # up to date
    # a new global decoder is a new input: synthesis runs again, into a new run
    cvae_federated.receive_global(ws, rnd2, server_round=2, rounds=2)
    assert run_one(ws, "synthesize")
    assert json.loads((ws.synth / "latest.json").read_text())["run_id"] != run


def test_release_reports_failures_instead_of_raising(federated_site):
    from node.cvae import federated as cvae_federated

    ws = federated_site
    out = cvae_federated.release(ws)  # no global decoder yet: synthesize refuses
    assert out["released"] == -1.0 and "has not finished" in out["error"]
    assert json.loads((ws.reports / "cvae_federated.json").read_text()) == out


def test_dp_federated_rounds_are_one_plan_and_the_release_reports_its_epsilon(tiny_workspace):
    from common.config import commented_yaml, load_site_config
    from common.fileio import atomic_write_text
    from node.cvae import federated as cvae_federated
    from node.cvae.checkpoint import load_cvae
    from node.stages import run_one, run_pipeline

    ws = tiny_workspace
    cfg = load_site_config(ws.config_path)
    cfg.synth.route = "cvae"
    cfg.synth.cvae = CvaeConfig(federated=True, dp=True, dp_epsilon=4.0, max_epochs=10)
    atomic_write_text(ws.config_path, commented_yaml(cfg, title="cvae, federated, dp"))
    run_pipeline(ws, upto="train")
    local = load_cvae(ws.models / "cvae.safetensors")
    assert local.epochs_trained == 0 and local.epsilon is None  # no local pre-training outside the plan

    init = CVAE(local.model.d_in, 2, hidden=local.model.hidden, latent=local.model.latent).decoder_state()
    rounds, epochs = 3, 2
    with pytest.raises(cvae_federated.FederatedCvaeError, match="no record of what its earlier rounds spent"):
        cvae_federated.local_update(ws, init, server_round=2, epochs=epochs, rounds=rounds)
    spent, dec = [], init
    for rnd in range(1, rounds + 1):
        dec, *_ = cvae_federated.local_update(ws, dec, server_round=rnd, epochs=epochs, rounds=rounds)
        fed = load_cvae(ws.models / "cvae_fed.safetensors")
        assert fed.info["calibrated_epochs"] == rounds * epochs
        spent.append(fed.epsilon)
    assert spent[0] < spent[1] < spent[2] <= 4.0 + 0.05  # composed across rounds, the plan spends its target
    assert spent[2] > 3.0
    noise = {round(h[0], 9) for h in fed.info["dp_history"]}
    assert len(noise) == 1  # one noise multiplier across the plan's rounds

    cvae_federated.receive_global(ws, dec, server_round=rounds, rounds=rounds)
    assert run_one(ws, "synthesize")
    run = json.loads((ws.synth / "latest.json").read_text())["run_id"]
    synth = json.loads((ws.synth / run / "synth.json").read_text())
    assert synth["dp_epsilon"] == pytest.approx(spent[2]) and synth["dp_delta"] == fed.delta
    # the "dp" block the audit signs: per patient, the plan's parts, the federated caveat
    dp = synth["dp"]
    assert dp["enabled"] and dp["unit"] == "patient" and dp["epsilon"] == pytest.approx(spent[2])
    assert dp["group_size_k"] == 3 and dp["budget"]["sgd"]["steps"] == sum(h[2] for h in fed.info["dp_history"])
    assert dp["budget"]["noise_scale"]["computed_through"] == "the federation's decoder"
    assert any("validation loss, reported to the coordinator" in c for c in dp["caveats"])
    # every round kept the scaler its start paid for
    assert torch.equal(fed.lo, local.lo) and torch.equal(fed.hi, local.hi)


def test_the_coordinator_stops_when_the_cvae_run_did_not_complete_and_reports_each_sites_release(tmp_path):
    from common.flower import FlowerError
    from server.coordinator import cvae_outcome

    failed = {"run_id": 42, "status": "finished:failed", "completed": False, "rounds": 3, "rounds_completed": 1}
    with pytest.raises(FlowerError, match=r"run 42 did not complete \(finished:failed, rounds 1/3\).*results.json"):
        cvae_outcome(failed, tmp_path / "cvae")
    done = {
        "completed": True,
        "release": {
            "site-a": {"released": 1.0},
            "site-b": {"released": 0.0},
            "site-c": {"released": -1.0},
            "node-9": {"error": "no reply to query.release within 60 s"},
        },
    }
    lines = cvae_outcome(done, tmp_path / "cvae")
    assert lines == [
        "  node-9: no reply to query.release within 60 s",
        "  site-a: published its bundle",
        "  site-b: published nothing: its audit did not pass",
        "  site-c: failed to synthesize, audit or publish (see its reports/cvae_federated.json)",
    ]
    assert "no site sent a release result" in cvae_outcome({"completed": True}, tmp_path / "cvae")[0]


def _query_release(ws, release) -> float:
    """What the ClientApp answers to the ServerApp's query.release, as a SuperNode hands it over."""
    import time

    from flwr.app import ConfigRecord, Context, Message, Metadata

    from node.federation.clientapp import app

    meta = Metadata(
        run_id=1,
        message_id="m1",
        src_node_id=1,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=600.0,
        message_type="query.release",
    )
    msg = Message(RecordDict({"config": ConfigRecord(release.to_config())}), metadata=meta)
    ctx = Context(run_id=1, node_id=7, node_config={"site-dir": str(ws.root)}, state=RecordDict(), run_config={})
    reply = app(msg, ctx)
    assert reply.content["site"]["name"] == ws.config().name
    return reply.content["metrics"]["released"]


def test_the_release_query_publishes_only_from_the_runs_final_decoder(federated_site):
    from common.messages import CvaeRelease
    from node.cvae import federated as cvae_federated
    from node.cvae.checkpoint import load_cvae

    ws = federated_site
    decoder = load_cvae(ws.models / "cvae.safetensors").model.decoder_state()
    sha = state_sha256(decoder)
    cvae_federated.receive_global(ws, decoder, server_round=2, rounds=2)
    assert _query_release(ws, CvaeRelease(rounds=2, global_decoder_sha256="0" * 64)) == -1.0
    report = json.loads((ws.reports / "cvae_federated.json").read_text())
    assert f"holds the federation's decoder {sha}, not the run's final decoder {'0' * 64}" in report["error"]
    assert not (ws.synth / "latest.json").exists()  # nothing synthesized from another run's decoder
    assert _query_release(ws, CvaeRelease(rounds=2, global_decoder_sha256=sha)) in (0.0, 1.0)
    assert (ws.synth / "latest.json").exists()
    assert json.loads((ws.reports / "cvae_federated.json").read_text())["error"] is None


def test_the_release_is_asked_of_every_node_and_a_silent_one_is_named(monkeypatch):
    from flwr.app import ConfigRecord, Message
    from flwr.supercore.task_identity import TaskIdentity

    from common.messages import CvaeRelease, spec_of
    from server.serverapp import send_release

    class Grid:  # the two calls send_release makes of Flower's Grid; node 2 never answers
        def get_node_ids(self):
            return [1, 2]

        def send_and_receive(self, messages, *, timeout):
            self.sent = list(messages)
            first = self.sent[0]
            site, released = ConfigRecord({"name": "site-a"}), MetricRecord({"released": 1.0})
            return [Message(RecordDict({"site": site, "metrics": released}), reply_to=first)]

    for field in ("_run_id", "_node_id", "_task_id"):  # what a ServerApp process has set when it builds messages
        monkeypatch.setattr(TaskIdentity, field, 1)
    grid, release = Grid(), CvaeRelease(rounds=2, global_decoder_sha256="cd" * 32)
    out = send_release(grid, release, timeout=60)
    assert out == {"site-a": {"released": 1.0}, "node-2": {"error": "no reply to query.release within 60 s"}}
    assert [m.metadata.dst_node_id for m in grid.sent] == [1, 2]
    assert all(m.metadata.message_type == "query.release" for m in grid.sent)
    assert spec_of(grid.sent[1].content["config"]) == release
