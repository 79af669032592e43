"""The federation's downstream training simulated in one process, as the ClientApp and the
ServerApp do it: each site its own seed and order (node.federation.task.site_round_seed), local
epochs sized by node.federation.task.epochs_for, FedAvg as the mean of the sites' weights by record
count, FedProx's proximal term when asked; and the records dealt to the sites (`partition`).
Used by bench.evaluation's rows and bench.pool_real.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from common.config import DownstreamConfig
from common.models import DownstreamCNN, EmbeddingHead
from node.federation.task import class_weights_for, epochs_for, evaluate_classifier, site_round_seed, train_classifier


def round_epochs(n: int, ds: DownstreamConfig) -> int:
    """A site's epochs in one round on n records, as the ClientApp sizes them."""
    return epochs_for(n, epochs=ds.local_epochs, min_steps=ds.min_local_steps, batch_size=ds.batch_size)


def new_model(x: np.ndarray, n_classes: int, ds: DownstreamConfig) -> torch.nn.Module:
    """The federation's downstream model for records x: DownstreamCNN on images uint8 [N,H,W],
    EmbeddingHead on embeddings float [N,D] (the CVAE route's)."""
    if x.ndim == 2:
        return EmbeddingHead(x.shape[1], n_classes, hidden=ds.head_hidden)
    return DownstreamCNN(n_classes, width=ds.width, image_size=x.shape[-1])


def train_local(
    model: torch.nn.Module, x: np.ndarray, y: np.ndarray, *, n_classes: int, epochs: int, ds: DownstreamConfig, **kw
):
    """train_classifier as the ClientApp calls it: on embeddings the head's scaler is fitted on
    the records first and nothing is augmented; the class weights ds.class_weighting names."""
    if x.ndim == 2:
        model.fit_scaler(torch.from_numpy(x))
    augment = "none" if x.ndim == 2 else "light"
    train_classifier(
        model,
        x,
        y,
        epochs=epochs,
        lr=ds.lr_for("cvae" if x.ndim == 2 else "plan"),
        batch_size=ds.batch_size,
        device="cpu",
        augment=augment,
        class_weights=class_weights_for(y, n_classes, ds.class_weighting),
        **kw,
    )


def fedavg(
    train_sets: list[tuple[np.ndarray, np.ndarray]],
    tests: list[tuple[np.ndarray, np.ndarray]],
    *,
    n_classes: int,
    ds: DownstreamConfig,
    seed: int,
    proximal_mu: float = 0.0,
) -> dict:
    """FedAvg over the sites' (records, labels [N_k]), FedProx when `proximal_mu` > 0 (the same
    aggregation; each site's loss adds mu/2 ||w - w_global||^2, as the ClientApp does); the global
    model after the last round evaluated on each site's test (records, labels):
    {"sites": [metrics per site], "rounds": completed}."""
    torch.manual_seed(seed)
    model = new_model(tests[0][0], n_classes, ds)
    completed = 0
    for r in range(1, ds.rounds + 1):
        states, weights = [], []
        for k, (x, y) in enumerate(train_sets):
            local = copy.deepcopy(model)
            seed_k = site_round_seed(f"site{k}", r) + seed
            epochs = round_epochs(len(y), ds)
            train_local(local, x, y, n_classes=n_classes, epochs=epochs, ds=ds, seed=seed_k, proximal_mu=proximal_mu)
            states.append(local.state_dict())
            weights.append(len(y))
        w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        model.load_state_dict(
            {
                n: (sum(wi * s[n].double() for wi, s in zip(w, states)).to(t.dtype) if t.is_floating_point() else t)
                for n, t in states[0].items()
            }
        )
        completed = r
    return {"sites": [evaluate_classifier(model, x, y, device="cpu") for x, y in tests], "rounds": completed}


def alone(x: np.ndarray, y: np.ndarray, *, n_classes: int, ds: DownstreamConfig, seed: int) -> torch.nn.Module:
    """One model trained for as many epochs as a federated site trains in all its rounds."""
    torch.manual_seed(seed)
    model = new_model(x, n_classes, ds)
    train_local(model, x, y, n_classes=n_classes, epochs=ds.rounds * round_epochs(len(y), ds), ds=ds, seed=seed)
    return model


def federation_steps(sizes: list[int], ds: DownstreamConfig) -> int:
    """Optimiser steps the whole federation takes: every site, every round (sites of `sizes` records)."""
    return sum(ds.rounds * round_epochs(n, ds) * math.ceil(n / ds.batch_size) for n in sizes)


def central(
    train_sets: list[tuple[np.ndarray, np.ndarray]], *, n_classes: int, ds: DownstreamConfig, seed: int
) -> torch.nn.Module:
    """One model on the union of the sites' (records, labels [N_k]), given at least as many optimiser
    steps as the federation takes in all (federation_steps). With one site's schedule instead, the
    union (3x the records a site has, so a third of the epochs min_local_steps gives) trained for a
    third of FedAvg's total steps and fell below FedAvg on real data: a yardstick below what it
    measures."""
    x = np.concatenate([x for x, _ in train_sets])
    y = np.concatenate([y for _, y in train_sets])
    steps_per_epoch = math.ceil(len(y) / ds.batch_size)
    epochs = math.ceil(federation_steps([len(y_k) for _, y_k in train_sets], ds) / steps_per_epoch)
    torch.manual_seed(seed)
    model = new_model(x, n_classes, ds)
    train_local(model, x, y, n_classes=n_classes, epochs=epochs, ds=ds, seed=seed)
    return model


def partition(labels: np.ndarray, *, n_sites: int, alpha: float | None, seed: int) -> list[np.ndarray]:
    """Indices [n_k] of each site's records. alpha None: a random equal split; else each class's
    records are dealt to the sites in shares drawn from Dirichlet(alpha), redrawn until every site
    holds at least half its equal share of the records (a site with a handful cannot train a GAN)."""
    rng = np.random.default_rng(seed)
    if alpha is None:
        return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), n_sites)]
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(n_sites)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * n_sites))[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k] += chunk.tolist()
        if min(len(p) for p in parts) >= len(labels) / n_sites / 2:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"no Dirichlet({alpha}) split of {len(labels)} records gives every one of {n_sites} sites enough")
