"""Stage `local_only`: the downstream classifier trained on this site's real train split alone
and tested on its real test split, the yardstick for what the federation adds."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from common.config import DownstreamConfig
from common.fileio import atomic_write_json
from common.models import downstream_model
from node.cvae.embedder import extractor_digest
from node.federation.task import class_weights_for, epochs_for, evaluate_classifier, train_classifier
from node.routes import route as route_named
from node.site.attempts import data_digest
from node.site.checkpoint import config_digest
from node.site.device import pick_device
from node.site.ingest import read_splits
from node.site.status import read_json
from node.site.workspace import Workspace


def report_path(ws: Workspace, ds: DownstreamConfig) -> Path:
    """Where the yardstick trained with `ds` (a yardstick(): DownstreamConfig.YARDSTICK_FIELDS)
    lives: reports/local_only.json for site.yaml's settings (the kit's), else a file of its own per
    settings, so that a federation whose settings changed after the kit does not make the stage and
    the rounds retrain over each other's report."""
    if ds == ws.config().downstream.yardstick():
        return ws.reports / "local_only.json"
    return ws.reports / f"local_only-{config_digest(ds)[:12]}.json"


def _inputs(ws: Workspace, ds: DownstreamConfig) -> dict:
    """What a yardstick depends on besides the code: a report made from other inputs is trained again."""
    cfg = ws.config()
    return {
        "downstream": ds.model_dump(mode="json"),
        "route": cfg.synth.route,
        "data": data_digest(ws),
        "extractor": extractor_digest(cfg.synth.extractor) if cfg.synth.route == "cvae" else None,
    }


def local_only(ws: Workspace, *, downstream: DownstreamConfig | None = None) -> dict:
    """Train the downstream model (common.models.downstream_model for the site's route: a CNN on
    images, a head on embeddings) with the federation's downstream hyperparameters (`downstream`,
    else site.yaml's, which the site kit sets; epochs = rounds times a client's epochs a round on
    data of this size, node.federation.task.epochs_for) and write it to report_path:
    {"test_accuracy", "test_loss", "test" (every metric of node.federation.task.evaluate_classifier),
    "n_train", "n_test", ...}. Reused when it exists for the same settings, data and extractor."""
    cfg = ws.config()
    ds = (downstream or cfg.downstream).yardstick()
    route = cfg.synth.route
    path, inputs = report_path(ws, ds), _inputs(ws, ds)
    done = read_json(path)
    if done and done.get("inputs") == inputs:
        return done  # trained from these inputs already (the stage, or an earlier round)
    device = pick_device(cfg.device)
    (x_train, y_train), (x_test, y_test) = (
        route_named(route).split_records(ws, s, device=device) for s in ("train", "test")
    )
    n_classes = read_splits(ws)["n_classes"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.models.seed)
        model = downstream_model(
            n_classes,
            route=route,
            width=ds.width,
            image_size=cfg.data.image_size,
            embedding_dim=cfg.synth.extractor.dim,
            head_hidden=ds.head_hidden,
        )
        if route == "cvae":
            model.fit_scaler(torch.from_numpy(x_train))
    # as many epochs as a federated client trains in all its rounds on data of this size
    epochs = ds.rounds * epochs_for(
        len(y_train), epochs=ds.local_epochs, min_steps=ds.min_local_steps, batch_size=ds.batch_size
    )
    t0 = time.time()
    loss = train_classifier(
        model,
        x_train,
        y_train,
        epochs=epochs,
        lr=ds.lr_for(route),
        batch_size=ds.batch_size,
        device=device,
        seed=cfg.models.seed,
        augment=route_named(route).augment,
        class_weights=class_weights_for(y_train, n_classes, ds.class_weighting),
    )
    ev = evaluate_classifier(model, x_test, y_test, device=device)
    report = {
        "test_accuracy": ev["accuracy"],
        "test_loss": ev["loss"],
        "n_train": len(y_train),
        "n_test": ev["n"],
        "test": ev,
        "final_train_loss": loss,
        "epochs": epochs,
        "downstream": ds.model_dump(mode="json"),
        "route": route,
        "inputs": inputs,
        "seconds": round(time.time() - t0, 2),
    }
    atomic_write_json(path, report)
    return report
