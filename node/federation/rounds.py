"""One federated round of the downstream classifier at a site, as plain functions the ClientApp's
handlers call: what the site trains on, its local update, and its evaluation beside the
local-only yardstick. The handlers only translate Flower messages to and from these.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from common.content import ContentSpec
from common.messages import DownstreamRound
from common.models import downstream_model
from node.federation.baseline import local_only
from node.federation.task import (
    class_weights_for,
    epochs_for,
    evaluate_classifier,
    site_round_seed,
    train_classifier,
    with_real_share,
)
from node.release.pull import PoolIncomplete, load_pool_data
from node.routes import route
from node.site.device import pick_device
from node.site.workspace import Workspace

# `plan-node start` pulls every coordinator.pull_every_s (node/start.py): a round gives it a few turns
POOL_WAIT_TURNS = 6
POOL_POLL_S = 1.0


def training_records(
    ws: Workspace,
    train_on: str,
    route_name: str = "plan",
    spec: ContentSpec | None = None,
    *,
    bundles: list[str] | None = None,
    wait_s: float | None = None,
    real_share: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Records (images uint8 [N,H,W], or embeddings float32 [N,D] on the CVAE route) and labels
    int64 [N]: the verified pool ("pool"), the site's real train split ("real"), or both
    ("pool+real", the real records repeated to at least `real_share` of all: with_real_share). The
    pool is the run's `bundles` (every verified bundle when None). This site pulls and verifies them
    beside its SuperNode (`plan-node start`, node/start.py), not here: a bundle pooled just before
    the run may still be on its way, so a round waits up to `wait_s` seconds (default:
    POOL_WAIT_TURNS pulls) for it, then refuses (PoolIncomplete) rather than train on part of the
    pool. Bundles that do not fit `spec` are quarantined (node.release.pull)."""
    if train_on not in ("pool", "pool+real", "real"):
        raise ValueError(f"train-on {train_on!r}: expected pool, pool+real or real")
    if train_on == "pool+real" and real_share is None:
        raise ValueError("train-on pool+real needs real_share (the federation's downstream.real_share)")
    if wait_s is None:
        wait_s = POOL_WAIT_TURNS * ws.config().coordinator.pull_every_s
    pool = real = None
    if train_on in ("pool", "pool+real"):
        pool_route, data, labels = _verified_pool(ws, spec, route_name, bundles, wait_s=wait_s)
        if len(labels) == 0:
            raise RuntimeError(f"{ws.root}: the verified pool is empty; nothing to train on")
        if pool_route != route_name:
            raise RuntimeError(
                f"{ws.root}: the pool holds {pool_route!r}-route bundles, the federation trains on route {route_name!r}"
            )
        pool = data, np.asarray(labels, dtype=np.int64)
    if train_on in ("real", "pool+real"):
        data, labels = route(route_name).split_records(ws, "train", device=pick_device(ws.config().device))
        real = data, np.asarray(labels, dtype=np.int64)
    if pool is not None and real is not None:
        return with_real_share(pool, real, real_share=real_share)
    return pool if real is None else real


def _verified_pool(ws: Workspace, spec, route_name: str, bundles: list[str] | None, *, wait_s: float):
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return load_pool_data(ws, spec=spec, route=route_name, bundles=bundles)
        except PoolIncomplete:
            if time.monotonic() >= deadline:
                raise
            time.sleep(POOL_POLL_S)


def model_for(spec: DownstreamRound, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The downstream model the spec describes, holding `state` (the global model)."""
    model = downstream_model(
        spec.n_classes,
        route=spec.route,
        width=spec.width,
        image_size=spec.image_size,
        embedding_dim=spec.embedding_dim,
        head_hidden=spec.head_hidden,
    )
    model.load_state_dict(state)
    return model


def local_update(ws: Workspace, model: torch.nn.Module, spec: DownstreamRound) -> tuple[int, float]:
    """Train `model` in place for this round on what spec.train_on names, with this site's own
    seed and order; FedProx's proximal term pulls towards the weights it came with. Returns
    (records trained on, mean training loss)."""
    data, labels = training_records(
        ws, spec.train_on, spec.route, spec.content(), bundles=spec.pool_ids(), real_share=spec.real_share
    )
    if spec.route == "cvae":
        model.fit_scaler(torch.from_numpy(data))  # from the pool: the same at every site
    global_params = [p.detach().clone() for p in model.parameters()]
    loss = train_classifier(
        model,
        data,
        labels,
        epochs=epochs_for(
            len(labels), epochs=spec.local_epochs, min_steps=spec.min_local_steps, batch_size=spec.batch_size
        ),
        lr=spec.downstream().lr_for(spec.route),
        batch_size=spec.batch_size,
        device=pick_device(ws.config().device),
        seed=site_round_seed(ws.config().name, spec.server_round),
        proximal_mu=spec.proximal_mu,
        global_params=global_params,
        augment=route(spec.route).augment,
        class_weights=class_weights_for(labels, spec.n_classes, spec.class_weighting),
    )
    return len(labels), float(loss)


def evaluate_round(ws: Workspace, model: torch.nn.Module, spec: DownstreamRound) -> dict[str, float]:
    """The global model on this site's real test split, and beside it the local-only yardstick
    (the same model class and hyperparameters on this site's real data alone), read from
    reports/local_only.json: the local_only stage trained it before the SuperNode joined, with the
    settings of the site kit. Only when the federation changed its downstream settings since the
    kit was made is it trained here, once, into a report of its own (baseline.report_path). Every
    site returns the same keys (the model's classes fix the recall-<c> set): Flower aggregates only
    replies whose metrics agree."""
    device = pick_device(ws.config().device)
    test_x, test_y = route(spec.route).split_records(ws, "test", device=device)
    result = evaluate_classifier(model, test_x, test_y, device=device)
    local = local_only(ws, downstream=spec.downstream())["test"]
    return {
        "num-examples": int(result.pop("n")),
        **{k: float(v) for k, v in result.items()},
        **{f"local-only-{k}": float(local[k]) for k in ("accuracy", "balanced-accuracy", "auroc")},
    }
