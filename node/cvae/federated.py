"""The site's side of the federated CVAE (FederationConfig.cvae_federated; Di Salvo et al., MICCAI
2025): FedAvg over the CVAE's decoder only. The ClientApp's handlers (node.federation.clientapp) call these.

local_update    train handler: the site's CVAE with the federation's decoder put in, trained a
                fixed number of epochs on its train embeddings (node.cvae.generator.train_cvae, init=,
                epochs=); the updated CVAE stays in models/cvae_fed (the encoder never leaves the
                site); the decoder's weights go back. Round 1 starts from the CVAE the site trained
                locally (`plan-node start`'s train stage), decoder included (warm start): the
                coordinator's initial decoder is then only the wire format.
receive_global  evaluate handler: the federation's decoder, with this site's encoder, min-max
                scaler and its own noise scale (the reconstruction error through the federation's
                decoder; with dp a DP estimate at the plan's noise-scale share), saved as
                models/cvae_global (+ sidecar naming the decoder's sha256 and whether it is the
                run's final one); its loss on the site's validation split.
release         query handler "release", sent once the run is over: synthesize -> audit -> publish
                from the final decoder (checked against the run's sha256), as `plan-node start`
                does on the local route; errors are logged and returned, never raised.
"""

from __future__ import annotations

import copy
import logging
import math
import traceback

import numpy as np
import torch

from common import errors
from common.fileio import atomic_write_json
from common.models import CVAE, state_sha256
from node.cvae import dp as cvae_dp
from node.cvae.checkpoint import load_cvae, save_cvae
from node.cvae.embeddings import split_embeddings
from node.cvae.generator import CvaeResult, stratified_split, train_cvae
from node.cvae.losses import dp_residual_rms, eval_loss, one_hot, residual_rms
from node.cvae.scaling import scale
from node.cvae.stages import GLOBAL_NAME, synth_model
from node.site.checkpoint import read_sidecar
from node.site.device import pick_device
from node.site.ingest import load_split, read_splits
from node.site.workspace import Workspace

log = logging.getLogger(__name__)

FED_NAME = "cvae_fed"  # the site's CVAE after its latest local update in a federated run


class FederatedCvaeError(RuntimeError):
    """The site cannot take part in the federated CVAE (not set up for it, or another architecture)."""

    exit_code = errors.CONFIG


def awaits_global_decoder(ws: Workspace) -> bool:
    """CVAE route (node.routes): True when the federation trains the CVAE across sites
    (synth.cvae.federated) and models/ does not yet hold its final decoder grown from this site's
    current CVAE: the site trains, joins, and synthesizes only once that decoder reaches it
    (receive_global, release)."""
    if not ws.config().synth.cvae.federated:
        return False
    path = ws.models / f"{GLOBAL_NAME}.safetensors"
    if not (path.with_suffix(".json").exists() and (ws.models / "cvae.json").exists()):
        return True
    side = read_sidecar(path)
    return not (
        bool(side.get("final"))
        and side.get("base_weights_sha256") == read_sidecar(ws.models / "cvae.safetensors")["weights_sha256"]
    )


def _check(ws: Workspace, model: CVAE, arch: dict | None) -> None:
    cfg = ws.config()
    if cfg.synth.route != "cvae" or not cfg.synth.cvae.federated:
        raise FederatedCvaeError(
            f"{ws.config_path}: the federation trains the CVAE across sites, but this site has "
            f"synth.route {cfg.synth.route!r}, synth.cvae.federated {cfg.synth.cvae.federated} "
            "(install the federation's site kit again)"
        )
    if arch:
        mine = {"d-in": model.d_in, "n-classes": model.n_classes, "hidden": model.hidden, "latent": model.latent}
        if any(int(arch[k]) != v for k, v in mine.items() if k in arch):
            raise FederatedCvaeError(
                f"{ws.models / 'cvae'}.safetensors: this site's CVAE is {mine}, the federation's "
                f"decoder is {dict(arch)}; set synth.cvae.hidden and latent_dim to the federation's"
            )


def _base(ws: Workspace) -> str:
    return read_sidecar(ws.models / "cvae.safetensors")["weights_sha256"]


def _current(ws: Workspace) -> CvaeResult:
    """The site's latest CVAE: after its last local update (models/cvae_fed) if that grew from the
    CVAE of its current train stage, else that CVAE (models/cvae)."""
    fed = ws.models / f"{FED_NAME}.safetensors"
    if fed.with_suffix(".json").exists() and read_sidecar(fed).get("base_weights_sha256") == _base(ws):
        return load_cvae(fed)
    return load_cvae(ws.models / "cvae.safetensors")


def _train_data(ws: Workspace) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """The train split's embeddings [N,D], labels [N], the number of classes and the patient ids [N]."""
    cfg = ws.config()
    x, y = split_embeddings(ws, cfg.synth.extractor, "train", device=pick_device(cfg.device))
    return x, y, int(read_splits(ws)["n_classes"]), load_split(ws, "train").patient_ids


def _dp_history(ws: Workspace, start: CvaeResult, server_round: int) -> list:
    """With dp: what this run's earlier rounds spent on this site's records (empty in round 1)."""
    if server_round <= 1:
        return []
    history = start.info.get("dp_history")
    if not history:
        raise FederatedCvaeError(
            f"{ws.models / FED_NAME}.safetensors: round {server_round} of a federated CVAE with dp, "
            "but this site holds no record of what its earlier rounds spent "
            "(it did not train them, or its models were replaced): "
            "refusing to train without the privacy accounting; start a new federated run"
        )
    return history


def local_update(
    ws: Workspace,
    decoder: dict[str, torch.Tensor],
    *,
    server_round: int,
    epochs: int,
    rounds: int,
    arch: dict | None = None,
) -> tuple[dict[str, torch.Tensor], int, float, float]:
    """One round's local training. Returns (the decoder's state, records trained on, last epoch's
    mean train loss, its validation loss (nan without a validation split)).

    With synth.cvae.dp, the run's `rounds` x `epochs` epochs are one DP plan: round 1 calibrates
    the noise for all of them, later rounds continue its accounting (node.cvae.generator.train_cvae's
    dp_history), and the epsilon after the last round is what the released samples report."""
    cfg = ws.config()
    cc = cfg.synth.cvae
    start = load_cvae(ws.models / "cvae.safetensors") if server_round <= 1 else _current(ws)
    _check(ws, start.model, arch)
    if server_round > 1:
        start.model.load_decoder_state(decoder)
    # with dp every round keeps the scaler of the plan's start (models/cvae, `initial_cvae`), paid for once
    dp = (
        {"dp_plan_epochs": rounds * epochs, "dp_history": _dp_history(ws, start, server_round), "scaler": start}
        if cc.dp
        else {}
    )
    x, y, n_classes, groups = _train_data(ws)
    # the same seed as the site's own training: the same validation split, never trained on
    result = train_cvae(
        x,
        y,
        n_classes=n_classes,
        cfg=cc,
        seed=cfg.models.seed,
        device=pick_device(cfg.device),
        init=start.model,
        epochs=epochs,
        groups=groups,
        **dp,
    )
    save_cvae(
        ws.models / f"{FED_NAME}.safetensors",
        result,
        sidecar={"federated_round": server_round, "base_weights_sha256": _base(ws)},
    )
    last = result.history[-1]
    val = last["val_loss"]
    return (
        result.model.cpu().decoder_state(),
        int(result.info["n_train"]),
        float(last["train_loss"]),
        float("nan") if val is None else float(val),
    )


def _fit_figures(ws: Workspace, result: CvaeResult) -> tuple[float, int, torch.Tensor, dict | None]:
    """The CVAE's loss on the site's validation split (nan, 0 without one), the split's size, its
    noise scale on the site's train split, as train_cvae splits them (node.cvae.generator.residual_rms; with
    dp node.cvae.generator.dp_residual_rms over the records DP-SGD trained on, at the plan's noise-scale
    share, and that mechanism's details, else None)."""
    cfg = ws.config()
    cc = cfg.synth.cvae
    x, y, n_classes, groups = _train_data(ws)
    tr, va = stratified_split(y, cc.val_fraction, seed=cfg.models.seed)
    model = result.model.cpu()
    xs = scale(torch.from_numpy(x), result.lo.cpu(), result.hi.cpu())
    c = one_hot(torch.from_numpy(y), n_classes)
    noise_info = None
    if cc.dp:
        xs = xs.clamp(0, 1)  # as train_cvae clipped them into the DP or public bounds
        # DP-SGD trained on every record unless dp_early_stopping: the noise scale covers the same ones.
        # Recomputed each round with the same seed; only the final round's is sampled from and released.
        dp_tr = tr if cc.dp_early_stopping else np.arange(len(y))
        plan = cvae_dp.plan_budget(cc, groups[dp_tr])
        noise_sd, noise_info = dp_residual_rms(model, xs[dp_tr], c[dp_tr], groups[dp_tr], plan, seed=cfg.models.seed)
    else:
        noise_sd = residual_rms(model, xs[tr], c[tr])
    if len(va) == 0:
        return float("nan"), 0, noise_sd, noise_info
    # the same noise as train_cvae's validation (seed + 1), so the figures compare
    eps = torch.randn(len(va), model.latent, generator=torch.Generator().manual_seed(cfg.models.seed + 1))
    return eval_loss(model, xs[va], c[va], eps, cc.beta), int(len(va)), noise_sd, noise_info


def receive_global(
    ws: Workspace,
    decoder: dict[str, torch.Tensor],
    *,
    server_round: int,
    rounds: int,
    flower_run_id: int | None = None,
    arch: dict | None = None,
) -> dict:
    """Save the federation's decoder of `server_round` as models/cvae_global; returns
    {"val_loss", "n_val", "global_decoder_sha256"}."""
    current = _current(ws)
    _check(ws, current.model, arch)
    current.model.load_decoder_state(decoder)
    # the noise scale is this site's own reconstruction error through the federation's decoder
    val, n_val, noise_sd, noise_info = _fit_figures(ws, current)
    sha = state_sha256(decoder)
    info = {**current.info, "decoder": "federation", "encoder": "this site's, after its last local update"}
    if isinstance(info.get("dp"), dict) and info["dp"].get("enabled"):
        # the same plan's noise-scale share, spent on this noise scale instead of the local one (which
        # is never sampled from): the epsilon stays the local update's
        dp = copy.deepcopy(info["dp"])
        dp["budget"]["noise_scale"].update(noise_info or {}, computed_through="the federation's decoder")
        dp["caveats"].append(
            "each round's validation loss, reported to the coordinator, is computed on this site's records without DP"
        )
        info["dp"] = dp
    result = CvaeResult(
        model=current.model,
        lo=current.lo,
        hi=current.hi,
        epochs_trained=current.epochs_trained,
        best_epoch=current.epochs_trained,
        best_val_loss=None if math.isnan(val) else val,
        history=[],
        epsilon=current.epsilon,
        delta=current.delta,
        noise_sd=noise_sd,
        info=info,
    )
    save_cvae(
        ws.models / f"{GLOBAL_NAME}.safetensors",
        result,
        sidecar={
            "global_decoder_sha256": sha,
            "flower_run_id": flower_run_id,
            "server_round": server_round,
            "rounds": rounds,
            "final": server_round >= rounds,
            "base_weights_sha256": _base(ws),
        },
    )
    return {"val_loss": val, "n_val": n_val, "global_decoder_sha256": sha}


def release(ws: Workspace, *, decoder_sha256: str | None = None) -> dict:
    """synthesize -> audit -> publish from the federation's final decoder; with `decoder_sha256`,
    only when models/cvae_global holds that decoder (the run's, as the coordinator aggregated it).
    Returns {"released": 1.0 (published), 0.0 (audit did not pass) or -1.0 (failed), "bundle_id",
    "error"}; also written to reports/cvae_federated.json. Never raises: the SuperNode must stay up
    for the downstream run."""
    from node.release.publish import publish
    from node.stages import run_one

    out: dict = {"released": -1.0, "bundle_id": None, "error": None}
    try:
        held = read_sidecar(ws.models / f"{synth_model(ws)}.safetensors").get("global_decoder_sha256")
        if decoder_sha256 is not None and held != decoder_sha256:
            raise ValueError(
                f"{ws.models / GLOBAL_NAME}.safetensors holds the federation's decoder {held}, "
                f"not the run's final decoder {decoder_sha256}: nothing released from it"
            )
        for stage in ("synthesize", "audit"):
            run_one(ws, stage)
        bundle_id = publish(ws)
        out.update(released=1.0 if bundle_id else 0.0, bundle_id=bundle_id)
        log.info(
            "federated CVAE: %s",
            f"published bundle {bundle_id}" if bundle_id else "nothing published (see the audit report)",
        )
    except Exception as e:  # noqa: BLE001 - reported to the coordinator and in reports/, not fatal
        out["error"] = f"{type(e).__name__}: {e}"
        log.error("federated CVAE: synthesize/audit/publish failed: %s\n%s", out["error"], traceback.format_exc())
    atomic_write_json(ws.reports / "cvae_federated.json", out)
    return out
