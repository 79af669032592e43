"""The Flower ClientApp a site runs: thin handlers that unpack a message, call node.federation.task, pack the reply.

Two kinds of run reach it: the downstream classifier (every run), and, before it when the
federation trains the CVAE across sites (run config `task="cvae"`), the federated CVAE, whose
logic is node.cvae.federated.

The SuperNode is started with `--node-config 'site-dir="/abs/site"'`; everything the handlers
read (verified pool, real test split) lives in that workspace.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.config import DownstreamConfig
from common.content import ContentSpec
from common.eventlog import append_event
from common.fileio import atomic_write_json
from common.models import downstream_model
from node.cvae import federated as cvae_federated
from node.federation.baseline import local_only
from node.federation.records import split_records
from node.federation.task import epochs_for, evaluate_classifier, site_round_seed, train_classifier
from node.release.pull import load_pool_data, pull
from node.site.device import pick_device
from node.site.workspace import Workspace

app = ClientApp()


def _workspace(context: Context) -> Workspace:
    return Workspace(Path(str(context.node_config["site-dir"])))


def _model_from(msg: Message) -> tuple[torch.nn.Module, ConfigRecord]:
    cfg = msg.content["config"]
    model = downstream_model(
        int(cfg["n-classes"]),
        route=_route(cfg),
        width=int(cfg["width"]),
        image_size=int(cfg["image-size"]),
        embedding_dim=int(cfg.get("embedding-dim", 0)),
        head_hidden=int(cfg.get("head-hidden", 0)),
    )
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model, cfg


def _route(cfg: ConfigRecord) -> str:
    return str(cfg.get("route", "plan"))


def _content_spec(cfg: ConfigRecord) -> ContentSpec:
    """The federation's data as the ServerApp's config states it (common/content.py)."""
    if _route(cfg) == "cvae":
        return ContentSpec(n_classes=int(cfg["n-classes"]), embedding_dim=int(cfg.get("embedding-dim", 0)) or None)
    return ContentSpec(n_classes=int(cfg["n-classes"]), image_size=int(cfg["image-size"]))


def _reply(msg: Message, ws: Workspace, records: dict) -> Message:
    records["site"] = ConfigRecord({"name": ws.config().name})
    # what `plan-node status` shows as this site's part in the current run
    metrics = records.get("metrics")
    part = {
        "run_id": int(msg.metadata.run_id),
        "round": int(msg.content["config"].get("server-round", 0)),
        "phase": msg.metadata.message_type,
        "metrics": dict(metrics) if metrics is not None else None,
        "at": time.time(),
    }
    atomic_write_json(ws.reports / "federation.json", part)
    append_event(ws.reports / "rounds.jsonl", "round", **part)  # every round, for the site's dashboard
    return Message(RecordDict(records), reply_to=msg)


def _training_data(
    ws: Workspace, train_on: str, route: str = "plan", spec: ContentSpec | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Records (images uint8 [N,H,W], or embeddings float32 [N,D] on the CVAE route) and labels
    [N]: the verified pool, the site's real train split, or both. Pooled bundles that do not fit
    the federation's `spec` are quarantined, not trained on (node/release/pull.py)."""
    parts = []
    if train_on in ("pool", "pool+real"):
        # Bundles pooled after this site started its SuperNode are fetched and verified now, so
        # every round trains on the whole verified pool (and only on verified bundles).
        pull(ws)
        pool_route, data, labels = load_pool_data(ws, spec=spec, route=route)
        if len(labels) == 0:
            raise RuntimeError(f"{ws.root}: the verified pool is empty; nothing to train on")
        if pool_route != route:
            raise RuntimeError(
                f"{ws.root}: the pool holds {pool_route!r}-route bundles, the federation trains on route {route!r}"
            )
        parts.append((data, labels))
    if train_on in ("real", "pool+real"):
        parts.append(split_records(ws, "train", route=route, device=pick_device(ws.config().device)))
    if not parts:
        raise ValueError(f"train-on {train_on!r}: expected pool, pool+real or real")
    return np.concatenate([p[0] for p in parts]), np.concatenate([np.asarray(p[1], dtype=np.int64) for p in parts])


def _downstream(cfg: ConfigRecord) -> DownstreamConfig:
    return DownstreamConfig(
        width=int(cfg["width"]),
        rounds=int(cfg["rounds"]),
        local_epochs=int(cfg["local-epochs"]),
        min_local_steps=int(cfg.get("min-local-steps", 0)),
        lr=float(cfg["lr"]),
        batch_size=int(cfg["batch-size"]),
        head_hidden=int(cfg.get("head-hidden", 0)),
    )


def _is_cvae_task(msg: Message) -> bool:
    return str(msg.content["config"].get("task", "")) == "cvae"


def _cvae_arch(cfg: ConfigRecord) -> dict:
    return {k: int(cfg[k]) for k in ("d-in", "n-classes", "hidden", "latent") if k in cfg}


def _train_cvae(msg: Message, context: Context) -> Message:
    """Federated CVAE, train: the global decoder in, `local-epochs` epochs here, the decoder out."""
    ws = _workspace(context)
    cfg = msg.content["config"]
    decoder, n, train_loss, val_loss = cvae_federated.local_update(
        ws,
        msg.content["arrays"].to_torch_state_dict(),
        server_round=int(cfg["server-round"]),
        epochs=int(cfg["local-epochs"]),
        rounds=int(cfg["rounds"]),
        arch=_cvae_arch(cfg),
    )
    metrics = MetricRecord({"num-examples": n, "train-loss": train_loss, "val-loss": val_loss})
    return _reply(msg, ws, {"arrays": ArrayRecord(decoder), "metrics": metrics})


def _evaluate_cvae(msg: Message, context: Context) -> Message:
    """Federated CVAE, evaluate: keep the global decoder (models/cvae_global), report its validation
    loss; after the final round's, synthesize, audit and publish from it (failures reported, not raised)."""
    ws = _workspace(context)
    cfg = msg.content["config"]
    server_round, rounds = int(cfg["server-round"]), int(cfg["rounds"])
    got = cvae_federated.receive_global(
        ws,
        msg.content["arrays"].to_torch_state_dict(),
        server_round=server_round,
        rounds=rounds,
        flower_run_id=int(msg.metadata.run_id),
        arch=_cvae_arch(cfg),
    )
    metrics = {"num-examples": max(1, got["n_val"]), "val-loss": float(got["val_loss"])}
    if server_round >= rounds:
        # every site sends the same keys in a round (Flower aggregates only agreeing MetricRecords)
        metrics["released"] = float(cvae_federated.release(ws)["released"])
    return _reply(msg, ws, {"metrics": MetricRecord(metrics)})


@app.train()
def train(msg: Message, context: Context) -> Message:
    if _is_cvae_task(msg):
        return _train_cvae(msg, context)
    ws = _workspace(context)
    model, cfg = _model_from(msg)
    route = _route(cfg)
    data, labels = _training_data(ws, str(cfg.get("train-on", "pool")), route, _content_spec(cfg))
    if route == "cvae":
        model.fit_scaler(torch.from_numpy(data))  # from the pool: the same at every site
    global_params = [p.detach().clone() for p in model.parameters()]
    loss = train_classifier(
        model,
        data,
        labels,
        epochs=epochs_for(
            len(labels),
            epochs=int(cfg["local-epochs"]),
            min_steps=int(cfg.get("min-local-steps", 0)),
            batch_size=int(cfg["batch-size"]),
        ),
        lr=float(cfg["lr"]),
        batch_size=int(cfg["batch-size"]),
        device=pick_device(ws.config().device),
        seed=site_round_seed(ws.config().name, int(cfg["server-round"])),
        proximal_mu=float(cfg.get("proximal-mu", 0.0)),
        global_params=global_params,
        augment="light" if route == "plan" else "none",
    )
    metrics = MetricRecord({"num-examples": len(labels), "train-loss": float(loss)})
    return _reply(msg, ws, {"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    if _is_cvae_task(msg):
        return _evaluate_cvae(msg, context)
    ws = _workspace(context)
    model, cfg = _model_from(msg)
    device = pick_device(ws.config().device)
    test_x, test_y = split_records(ws, "test", route=_route(cfg), device=device)
    result = evaluate_classifier(model, test_x, test_y, device=device)
    # The yardstick: the same model class and hyperparameters on this site's real data alone
    # (trained once, then read from reports/local_only.json).
    local = local_only(ws, downstream=_downstream(cfg))["test"]
    # Every site sends the same keys (the model's classes fix the recall-<c> set): Flower
    # aggregates only replies whose MetricRecords agree.
    metrics = MetricRecord(
        {
            "num-examples": int(result.pop("n")),
            **{k: float(v) for k, v in result.items()},
            **{f"local-only-{k}": float(local[k]) for k in ("accuracy", "balanced-accuracy", "auroc")},
        }
    )
    return _reply(msg, ws, {"metrics": metrics})
