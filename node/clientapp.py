"""The Flower ClientApp a site runs: thin handlers that unpack a message, call node.task, pack the reply.

The SuperNode is started with `--node-config 'site-dir="/abs/site"'`; everything the handlers
read (verified pool, real test split) lives in that workspace.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.models import DownstreamCNN
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
    return Message(RecordDict(records), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    ws = _workspace(context)
    model, cfg = _model_from(msg)
    # Bundles pooled after this site started its SuperNode are fetched and verified now, so
    # every round trains on the whole verified pool (and only on verified bundles).
    pull(ws)
    images, labels = load_pool(ws)
    if len(labels) == 0:
        raise RuntimeError(f"{ws.root}: the verified pool is empty; nothing to train on")
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
    model, _ = _model_from(msg)
    test = load_split(ws, "test")
    result = evaluate_classifier(model, test.images, test.labels, device=pick_device(ws.config().device))
    # Every site sends the same keys (the model's classes fix the recall-<c> set): Flower
    # aggregates only replies whose MetricRecords agree.
    metrics = MetricRecord({"num-examples": int(result.pop("n")), **{k: float(v) for k, v in result.items()}})
    return _reply(msg, ws, {"metrics": metrics})
