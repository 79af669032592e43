"""The Flower ClientApp a site runs: handlers that unpack a message into its typed spec
(common.messages), call node.federation.rounds or node.cvae.federated, and pack the reply.

Two kinds of run reach it: the downstream classifier (every run), and, before it when the
federation trains the CVAE across sites (task "cvae"), the federated CVAE, whose run ends with a
"query.release" message: synthesize, audit and publish from the final decoder.

The SuperNode is started with `--node-config 'site-dir="/abs/site"'`; everything the handlers
read (verified pool, real test split) lives in that workspace.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.eventlog import append_event
from common.fileio import atomic_write_json
from common.messages import CvaeRelease, CvaeRound, spec_of
from node.cvae import federated as cvae_federated
from node.federation.rounds import evaluate_round, local_update, model_for
from node.site.workspace import Workspace

app = ClientApp()


def _workspace(context: Context) -> Workspace:
    return Workspace(Path(str(context.node_config["site-dir"])))


def _reply(msg: Message, ws: Workspace, server_round: int, records: dict) -> Message:
    records["site"] = ConfigRecord({"name": ws.config().name})
    # what `plan-node status` shows as this site's part in the current run
    metrics = records.get("metrics")
    part = {
        "run_id": int(msg.metadata.run_id),
        "round": server_round,
        "phase": msg.metadata.message_type,
        "metrics": dict(metrics) if metrics is not None else None,
        "at": time.time(),
    }
    atomic_write_json(ws.reports / "federation.json", part)
    append_event(ws.reports / "rounds.jsonl", "round", **part)  # every round, for the site's dashboard
    return Message(RecordDict(records), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    ws, spec = _workspace(context), spec_of(msg.content["config"])
    state = msg.content["arrays"].to_torch_state_dict()
    if isinstance(spec, CvaeRound):
        decoder, n, train_loss, val_loss = cvae_federated.local_update(
            ws, state, server_round=spec.server_round, epochs=spec.local_epochs, rounds=spec.rounds, arch=spec.arch()
        )
        metrics = MetricRecord({"num-examples": n, "train-loss": train_loss, "val-loss": val_loss})
        return _reply(msg, ws, spec.server_round, {"arrays": ArrayRecord(decoder), "metrics": metrics})
    model = model_for(spec, state)
    n, loss = local_update(ws, model, spec)
    metrics = MetricRecord({"num-examples": n, "train-loss": loss})
    return _reply(msg, ws, spec.server_round, {"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    ws, spec = _workspace(context), spec_of(msg.content["config"])
    state = msg.content["arrays"].to_torch_state_dict()
    if isinstance(spec, CvaeRound):
        # keep the global decoder (models/cvae_global) and report its validation loss
        got = cvae_federated.receive_global(
            ws,
            state,
            server_round=spec.server_round,
            rounds=spec.rounds,
            flower_run_id=int(msg.metadata.run_id),
            arch=spec.arch(),
        )
        metrics = {"num-examples": max(1, got["n_val"]), "val-loss": float(got["val_loss"])}
        return _reply(msg, ws, spec.server_round, {"metrics": MetricRecord(metrics)})
    metrics = evaluate_round(ws, model_for(spec, state), spec)
    return _reply(msg, ws, spec.server_round, {"metrics": MetricRecord(metrics)})


@app.query("release")
def release(msg: Message, context: Context) -> Message:
    ws, spec = _workspace(context), spec_of(msg.content["config"])
    if not isinstance(spec, CvaeRelease):
        raise ValueError(f"query.release: task {spec.task!r}; expected 'cvae-release'")
    out = cvae_federated.release(ws, decoder_sha256=spec.global_decoder_sha256)
    # the outcome only: the reason for a failure stays in the site's reports/cvae_federated.json
    return _reply(msg, ws, spec.rounds, {"metrics": MetricRecord({"released": out["released"]})})
