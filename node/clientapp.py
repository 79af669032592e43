"""The Flower ClientApp a site runs: thin handlers that unpack a message, call node.task, pack the reply.

The SuperNode is started with `--node-config 'site-dir="/abs/site"'`; everything the handlers
read (verified pool, real test split) lives in that workspace.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.config import DownstreamConfig
from common.fileio import atomic_write_json
from common.models import DownstreamCNN
from node.baseline import local_only
from node.device import pick_device
from node.ingest import load_split
from node.pull import load_pool, pull
from node.task import evaluate_classifier, train_classifier
from node.workspace import Workspace

app = ClientApp()


def _workspace(context: Context) -> Workspace:
    return Workspace(Path(str(context.node_config["site-dir"])))


def _model_from(msg: Message) -> tuple[DownstreamCNN, ConfigRecord]:
    cfg = msg.content["config"]
    model = DownstreamCNN(int(cfg["n-classes"]), width=int(cfg["width"]), image_size=int(cfg["image-size"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model, cfg


def _reply(msg: Message, ws: Workspace, records: dict) -> Message:
    records["site"] = ConfigRecord({"name": ws.config().name})
    # what `plan-node status` shows as this site's part in the current run
    metrics = records.get("metrics")
    atomic_write_json(ws.reports / "federation.json", {
        "run_id": int(msg.metadata.run_id), "round": int(msg.content["config"].get("server-round", 0)),
        "phase": msg.metadata.message_type, "metrics": dict(metrics) if metrics is not None else None, "at": time.time(),
    })
    return Message(RecordDict(records), reply_to=msg)


def _training_data(ws: Workspace, train_on: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N,H,W] and labels [N]: the verified pool, the site's real train split, or both."""
    parts = []
    if train_on in ("pool", "pool+real"):
        # Bundles pooled after this site started its SuperNode are fetched and verified now, so
        # every round trains on the whole verified pool (and only on verified bundles).
        pull(ws)
        parts.append(load_pool(ws))
        if len(parts[0][1]) == 0:
            raise RuntimeError(f"{ws.root}: the verified pool is empty; nothing to train on")
    if train_on in ("real", "pool+real"):
        real = load_split(ws, "train")
        parts.append((real.images, real.labels))
    if not parts:
        raise ValueError(f"train-on {train_on!r}: expected pool, pool+real or real")
    return np.concatenate([p[0] for p in parts]), np.concatenate([np.asarray(p[1], dtype=np.int64) for p in parts])


def _downstream(cfg: ConfigRecord) -> DownstreamConfig:
    return DownstreamConfig(width=int(cfg["width"]), rounds=int(cfg["rounds"]), local_epochs=int(cfg["local-epochs"]),
                            lr=float(cfg["lr"]), batch_size=int(cfg["batch-size"]))


@app.train()
def train(msg: Message, context: Context) -> Message:
    ws = _workspace(context)
    model, cfg = _model_from(msg)
    images, labels = _training_data(ws, str(cfg.get("train-on", "pool")))
    global_params = [p.detach().clone() for p in model.parameters()]
    loss = train_classifier(
        model,
        images,
        labels,
        epochs=int(cfg["local-epochs"]),
        lr=float(cfg["lr"]),
        batch_size=int(cfg["batch-size"]),
        device=pick_device(ws.config().device),
        seed=int(cfg["server-round"]),
        proximal_mu=float(cfg.get("proximal-mu", 0.0)),
        global_params=global_params,
    )
    metrics = MetricRecord({"num-examples": len(labels), "train-loss": float(loss)})
    return _reply(msg, ws, {"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    ws = _workspace(context)
    model, cfg = _model_from(msg)
    test = load_split(ws, "test")
    result = evaluate_classifier(model, test.images, test.labels, device=pick_device(ws.config().device))
    # The yardstick: the same model class and hyperparameters on this site's real data alone
    # (trained once, then read from reports/local_only.json).
    local = local_only(ws, downstream=_downstream(cfg))["test"]
    # Every site sends the same keys (the model's classes fix the recall-<c> set): Flower
    # aggregates only replies whose MetricRecords agree.
    metrics = MetricRecord({
        "num-examples": int(result.pop("n")),
        **{k: float(v) for k, v in result.items()},
        **{f"local-only-{k}": float(local[k]) for k in ("accuracy", "balanced-accuracy", "auroc")},
    })
    return _reply(msg, ws, {"metrics": metrics})
