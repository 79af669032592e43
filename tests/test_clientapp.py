"""The ClientApp's handlers, called as a SuperNode calls them: Flower Messages in, Messages out
(the app dispatches by message type). Trained on the site's real split, so no exchange is needed;
the pool side of a round is tested in tests/test_publish_pull.py."""

import json
import time

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from common.messages import CvaeRelease, CvaeRound, DownstreamRound, spec_of
from common.models import downstream_model
from node.federation.clientapp import app
from node.site.ingest import ingest


def _spec(**kw) -> DownstreamRound:
    base = dict(
        route="plan",
        n_classes=2,
        width=4,
        image_size=16,
        embedding_dim=0,
        head_hidden=0,
        rounds=1,
        local_epochs=1,
        min_local_steps=0,
        lr=1e-2,
        head_lr=1e-2,
        batch_size=8,
        train_on="real",
        real_share=0.0,
    )
    return DownstreamRound(**{**base, **kw})


def _message(kind: str, spec: DownstreamRound, state: dict, server_round: int = 1) -> Message:
    """A message as the SuperNode hands it to the ClientApp (metadata set by the SuperLink)."""
    config = ConfigRecord({**spec.to_config(), "server-round": server_round})
    meta = Metadata(
        run_id=1,
        message_id="m1",
        src_node_id=1,
        dst_node_id=7,
        reply_to_message_id="",
        group_id=str(server_round),
        created_at=time.time(),
        ttl=600.0,
        message_type=kind,
    )
    return Message(RecordDict({"arrays": ArrayRecord(state), "config": config}), metadata=meta)


@pytest.fixture
def site(tiny_workspace):
    ingest(tiny_workspace)
    ctx = Context(
        run_id=1, node_id=7, node_config={"site-dir": str(tiny_workspace.root)}, state=RecordDict(), run_config={}
    )
    return tiny_workspace, ctx


def test_train_handler_returns_the_locally_trained_model(site):
    ws, ctx = site
    spec = _spec()
    torch.manual_seed(0)
    initial = downstream_model(2, route="plan", width=4, image_size=16, embedding_dim=0, head_hidden=0).state_dict()
    reply = app(_message("train", spec, initial), ctx)

    assert not reply.has_error()
    state = reply.content["arrays"].to_torch_state_dict()
    assert list(state) == list(initial)  # the wire format: the same keys, in the same order
    assert any(not torch.equal(state[k], initial[k]) for k in initial)  # it trained
    metrics = reply.content["metrics"]
    n_train = len(json.loads((ws.data / "splits.json").read_text())["train"])
    assert metrics["num-examples"] == n_train and metrics["train-loss"] > 0
    assert reply.content["site"]["name"] == "tiny"
    assert json.loads((ws.reports / "federation.json").read_text())["phase"] == "train"


def test_each_route_trains_at_its_own_step_size(site):
    """The PLAN route's CNN trains at lr; head_lr (the CVAE route's head) does not touch it."""
    _, ctx = site
    torch.manual_seed(0)
    initial = downstream_model(2, route="plan", width=4, image_size=16, embedding_dim=0, head_hidden=0).state_dict()

    def trained(**kw):
        return app(_message("train", _spec(**kw), initial), ctx).content["arrays"].to_torch_state_dict()

    base, other_head, other_lr = trained(), trained(head_lr=1.0), trained(lr=1e-4)
    assert all(torch.equal(base[k], other_head[k]) for k in base)
    assert any(not torch.equal(base[k], other_lr[k]) for k in base)
    spec = _spec(route="cvae", lr=1e-2, head_lr=3e-3)
    assert spec.downstream().lr_for("cvae") == 3e-3 and spec.downstream().lr_for("plan") == 1e-2


def test_evaluate_handler_reports_the_global_model_beside_local_only(site):
    ws, ctx = site
    torch.manual_seed(0)
    model = downstream_model(2, route="plan", width=4, image_size=16, embedding_dim=0, head_hidden=0)
    reply = app(_message("evaluate", _spec(), model.state_dict()), ctx)

    metrics = reply.content["metrics"]
    n_test = len(json.loads((ws.data / "splits.json").read_text())["test"])
    assert metrics["num-examples"] == n_test
    for key in ("accuracy", "balanced-accuracy", "auroc", "local-only-accuracy", "local-only-auroc"):
        assert 0.0 <= metrics[key] <= 1.0, key
    # the yardstick, trained once with the round's settings (not site.yaml's) into a report of its own
    from node.federation.baseline import report_path

    report = json.loads(report_path(ws, _spec().downstream()).read_text())
    assert report["test"]["accuracy"] == pytest.approx(metrics["local-only-accuracy"])
    assert not (ws.reports / "local_only.json").exists()


def test_evaluate_reads_the_yardstick_the_stage_trained_with_the_kits_settings(site):
    import yaml

    from node.federation.baseline import local_only, report_path

    ws, ctx = site
    spec = _spec()
    raw = yaml.safe_load(ws.config_path.read_text())
    raw["downstream"] = spec.downstream().model_dump(mode="json") | {"strategy": "fedprox"}  # as a kit writes it
    ws.config_path.write_text(yaml.safe_dump(raw))
    stage = local_only(ws)  # the node step before the SuperNode joins
    written = (ws.reports / "local_only.json").read_bytes()
    model = downstream_model(2, route="plan", width=4, image_size=16, embedding_dim=0, head_hidden=0)
    reply = app(_message("evaluate", spec, model.state_dict()), ctx)

    assert (ws.reports / "local_only.json").read_bytes() == written  # read, not trained again in the handler
    assert reply.content["metrics"]["local-only-accuracy"] == pytest.approx(stage["test"]["accuracy"])
    # a round with other hyperparameters than the kit's gets a yardstick trained with its own, beside
    app(_message("evaluate", _spec(lr=5e-3), model.state_dict()), ctx)
    assert (ws.reports / "local_only.json").read_bytes() == written
    assert json.loads(report_path(ws, _spec(lr=5e-3).downstream()).read_text())["downstream"]["lr"] == 5e-3
    # new data is a new yardstick, even with the same settings
    raw["data"].setdefault("phantom", {})["seed"] = 11
    ws.config_path.write_text(yaml.safe_dump(raw))
    ingest(ws)
    again = local_only(ws)
    assert again["inputs"]["data"] != stage["inputs"]["data"]
    assert (ws.reports / "local_only.json").read_bytes() != written


def test_a_config_the_spec_does_not_know_is_refused_by_name():
    config = {**_spec().to_config(), "server-round": 1, "learning-rate": 0.1}
    with pytest.raises(ValueError, match="learning-rate"):
        spec_of(config)
    with pytest.raises(ValueError, match="local-epochs"):
        spec_of({**_spec().to_config(), "local-epochs": 0})
    with pytest.raises(ValueError, match="task 'gan'"):
        spec_of({"task": "gan"})


def test_specs_round_trip_through_a_config_record():
    spec = _spec(train_on="pool+real")
    record = ConfigRecord({**spec.to_config(), "server-round": 3, "proximal-mu": 0.5})
    back = spec_of(record)
    assert back == spec.model_copy(update={"server_round": 3, "proximal_mu": 0.5})
    cvae = CvaeRound(rounds=2, local_epochs=1, d_in=8, n_classes=2, hidden=4, latent=2)
    assert spec_of(ConfigRecord(cvae.to_config())) == cvae
    release = CvaeRelease(rounds=2, global_decoder_sha256="ab" * 32)
    assert spec_of(ConfigRecord(release.to_config())) == release
    with pytest.raises(ValueError, match="global-decoder-sha256"):
        spec_of({**release.to_config(), "global-decoder-sha256": "not a digest"})
    with pytest.raises(ValueError, match="task 'mystery'; expected one of 'downstream', 'cvae', 'cvae-release'"):
        spec_of({"task": "mystery"})


def test_the_federations_real_share_reaches_every_site_in_the_spec():
    from common.config import FederationConfig

    fed = FederationConfig.model_validate({"n_classes": 2, "downstream": {"real_share": 0.25}})
    spec = DownstreamRound.of(fed, train_on="pool+real")
    assert spec_of(ConfigRecord({**spec.to_config(), "server-round": 1})).real_share == 0.25
    with pytest.raises(ValueError, match="real-share"):
        spec_of({**spec.to_config(), "real-share": 1.0})  # all real is train_on "real", not a share
    without = {k: v for k, v in spec.to_config().items() if k != "real-share"}
    with pytest.raises(ValueError, match="real-share: Field required"):
        spec_of(without)  # one default, the federation's: a site never falls back on a share of its own


def test_the_run_names_its_pool_and_a_malformed_pool_is_refused():
    from common.config import FederationConfig

    ids = ["b" * 32, "a" * 32]
    spec = DownstreamRound.of(FederationConfig(n_classes=2), train_on="pool", pool=ids)
    assert spec.pool_ids() == sorted(ids)
    assert spec_of(ConfigRecord({**spec.to_config(), "server-round": 1})).pool_ids() == sorted(ids)
    # training on real data names no pool; a run that names none trains on the whole verified pool
    assert DownstreamRound.of(FederationConfig(n_classes=2), train_on="real", pool=ids).pool_ids() is None
    assert _spec(train_on="pool").pool_ids() is None
    with pytest.raises(ValueError, match="pool"):
        spec_of({**spec.to_config(), "pool": "../../etc/passwd"})


def test_the_federations_initial_model_is_seeded_and_leaves_the_global_rng_alone():
    from common.config import FederationConfig
    from common.models import state_sha256
    from server.serverapp import initial_downstream

    fed = FederationConfig(n_classes=3)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = initial_downstream(fed).state_dict()
    assert torch.equal(torch.rand(1), before)  # the caller's random stream is untouched
    assert state_sha256(initial_downstream(fed).state_dict()) == state_sha256(first)
    assert first["head.weight"].shape == (3, 4 * fed.downstream.width)
