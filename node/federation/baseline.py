"""Stage `local_only`: the downstream classifier trained on this site's real train split alone
and tested on its real test split, the yardstick for what the federation adds."""

from __future__ import annotations

import time

import torch

from common.config import DownstreamConfig
from common.fileio import atomic_write_json
from common.models import downstream_model
from node.federation.task import epochs_for, evaluate_classifier, train_classifier
from node.routes import route as route_named
from node.site.device import pick_device
from node.site.ingest import read_splits
from node.site.status import read_json
from node.site.workspace import Workspace


def local_only(ws: Workspace, *, downstream: DownstreamConfig | None = None) -> dict:
    """Train the downstream model (common.models.downstream_model for the site's route: a CNN on
    images, a head on embeddings) with the federation's downstream hyperparameters (`downstream`,
    else site.yaml's, which the site kit sets; epochs = rounds times a client's epochs a round on
    data of this size, node.federation.task.epochs_for) and write reports/local_only.json
    {"test_accuracy", "test_loss", "test" (every metric of node.federation.task.evaluate_classifier),
    "n_train", "n_test", ...}. Reused when it exists for the same hyperparameters."""
    cfg = ws.config()
    ds = (downstream or cfg.downstream).yardstick()
    done = read_json(ws.reports / "local_only.json")
    route = cfg.synth.route
    if (
        done
        and done.get("downstream") == ds.model_dump(mode="json")
        and done.get("route", "plan") == route
        and "test" in done
    ):
        return done  # trained with these hyperparameters already (the stage, or an earlier evaluation)
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
        lr=ds.lr,
        batch_size=ds.batch_size,
        device=device,
        seed=cfg.models.seed,
        augment=route_named(route).augment,
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
        "seconds": round(time.time() - t0, 2),
    }
    atomic_write_json(ws.reports / "local_only.json", report)
    return report
