"""A trained CVAE, its scaler and its noise scale on disk: one safetensors file and its JSON sidecar
(node.site.checkpoint)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from common.models import CVAE
from node.cvae.generator import CvaeResult
from node.site.checkpoint import load_weights, read_sidecar, save_model


class _Packed(nn.Module):
    """The CVAE, its scaler and its noise scale as one state dict (model.*, lo, hi, noise_sd) for
    node.site.checkpoint."""

    def __init__(self, model: CVAE, lo: torch.Tensor, hi: torch.Tensor, noise_sd: torch.Tensor):
        super().__init__()
        self.model = model
        for name, t in (("lo", lo), ("hi", hi), ("noise_sd", noise_sd)):
            self.register_buffer(name, t.detach().float().cpu().clone())


def save_cvae(path: Path, result: CvaeResult, *, sidecar: dict | None = None) -> None:
    """Weights and scaler to `path` (.safetensors), architecture and training record to the JSON
    sidecar beside it (node.site.checkpoint.save_model: atomic, sidecar last). `sidecar` adds keys."""
    m = result.model
    if result.noise_sd is None:
        raise ValueError(f"{path}: refusing to save a CVAE without its noise_sd (node.cvae.generator.residual_rms)")
    meta = {
        "kind": "cvae",
        "noise_sd": True,
        "d_in": m.d_in,
        "n_classes": m.n_classes,
        "hidden": m.hidden,
        "latent": m.latent,
        "epochs_trained": result.epochs_trained,
        "best_epoch": result.best_epoch,
        "best_val_loss": result.best_val_loss,
        "epsilon": result.epsilon,
        "delta": result.delta,
        "history": result.history,
        "info": result.info,
    }
    save_model(Path(path), _Packed(m, result.lo, result.hi, result.noise_sd), sidecar={**meta, **(sidecar or {})})


def load_cvae(path: Path, *, device: torch.device | str = "cpu") -> CvaeResult:
    """A CvaeResult from `save_cvae`'s files, weights checked against the sidecar's sha256."""
    side = read_sidecar(Path(path))
    if side.get("kind") != "cvae":
        raise ValueError(f"{path}: not a CVAE checkpoint (sidecar kind {side.get('kind')!r})")
    if not side.get("noise_sd"):
        raise ValueError(
            f"{path}: a CVAE checkpoint from before the decoder's noise scale was stored; "
            "run `plan-node train --force` to retrain it"
        )
    model = CVAE(side["d_in"], side["n_classes"], hidden=side["hidden"], latent=side["latent"])
    zeros = torch.zeros(side["d_in"])
    packed = load_weights(Path(path), _Packed(model, zeros, zeros, zeros), device=device)
    model.eval()
    return CvaeResult(
        model=model,
        lo=packed.lo,
        hi=packed.hi,
        epochs_trained=side["epochs_trained"],
        best_epoch=side["best_epoch"],
        best_val_loss=side["best_val_loss"],
        history=side["history"],
        epsilon=side["epsilon"],
        delta=side["delta"],
        info=side["info"],
        noise_sd=packed.noise_sd,
    )
