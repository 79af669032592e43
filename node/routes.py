"""The two routes a site can make synthetic data by, each described once: its stages, the models
they write and read, and what its records are. Everything that differs between "plan" (images
from the GAN, node.plan) and "cvae" (embeddings from the CVAE, node.cvae) is looked up here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from node.cvae import federated as cvae_federated
from node.cvae import stages as cvae_stages
from node.cvae.embeddings import split_embeddings
from node.plan import synthesize as plan_synthesize
from node.plan import train as plan_train
from node.release.assets import fetch_extractor_weights
from node.site.ingest import load_split
from node.site.workspace import Workspace


def _split_images(ws: Workspace, split: str, *, device: torch.device | str) -> tuple[np.ndarray, np.ndarray]:
    s = load_split(ws, split)
    return s.images, np.asarray(s.labels, dtype=np.int64)


def _split_embeddings(ws: Workspace, split: str, *, device: torch.device | str) -> tuple[np.ndarray, np.ndarray]:
    return split_embeddings(ws, ws.config().synth.extractor, split, device=device)


def _fetch_extractor(ws: Workspace, *, say: Callable[[str], None]) -> None:
    fetch_extractor_weights(ws, ws.config().synth.extractor, say=say)


def _nothing_to_fetch(ws: Workspace, *, say: Callable[[str], None]) -> None:
    pass


def _never_waits(ws: Workspace) -> bool:
    return False


@dataclass(frozen=True)
class Route:
    name: str
    records: str  # the array candidates.npz and accepted.npz hold: "images" uint8 [N,H,W] or "embeddings" float32 [N,D]
    augment: str  # node.federation.task.train_classifier's augmentation for the downstream model on these records
    train: Callable[[Workspace], None]  # the stage: writes models/<model_names>
    synthesize: Callable[[Workspace], str]  # the stage: writes synth/<run>/candidates.npz, returns the run id
    run_id_for: Callable[[Workspace], str]  # the run id synthesize would write now
    model_names: tuple[str, ...]  # what train writes
    synth_reads: tuple[str, ...]  # the models synthesize reads (the first one's sidecar decides the run id)
    audit_reads: tuple[str, ...]  # the models the audit reads
    # (data, labels int64 [N]) of split "train", "holdout" or "test", as the downstream model sees them
    split_records: Callable[..., tuple[np.ndarray, np.ndarray]]
    fetch_assets: Callable[..., None]  # before training: what the route needs from the coordinator
    # True while the site must wait for a federated run before it synthesizes (plan-node start)
    awaits_federation: Callable[[Workspace], bool]


ROUTES = {
    "plan": Route(
        name="plan",
        records="images",
        augment="light",
        train=plan_train.train,
        synthesize=plan_synthesize.synthesize,
        run_id_for=plan_synthesize.run_id_for,
        model_names=plan_train.MODEL_NAMES,
        synth_reads=("G_ema", "phi_id", "phi_class"),
        audit_reads=("phi_id", "phi_attack", "phi_attack_wide", "D"),
        split_records=_split_images,
        fetch_assets=_nothing_to_fetch,
        awaits_federation=_never_waits,
    ),
    "cvae": Route(
        name="cvae",
        records="embeddings",
        augment="none",
        train=cvae_stages.train,
        synthesize=cvae_stages.synthesize,
        run_id_for=cvae_stages.run_id_for,
        model_names=cvae_stages.MODEL_NAMES,
        synth_reads=("cvae",),
        audit_reads=("phi_id", "phi_attack"),
        split_records=_split_embeddings,
        fetch_assets=_fetch_extractor,  # the pinned extractor's weights (arch tiny: none)
        awaits_federation=cvae_federated.awaits_global_decoder,  # the federated CVAE's final decoder
    ),
}


def route(name: str) -> Route:
    """The route called `name` ("plan" or "cvae"); ValueError naming the choices otherwise."""
    try:
        return ROUTES[name]
    except KeyError:
        raise ValueError(f"unknown route {name!r}; expected one of {sorted(ROUTES)}") from None


def site_route(ws: Workspace) -> Route:
    """The route the site's config (synth.route) chooses."""
    return route(ws.config().synth.route)
