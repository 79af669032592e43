"""The audit of candidate images (the PLAN route): the copy detector's thresholds and verdicts,
the feature spaces (pixels, phi_id, the attacker, LPIPS when its weights are present), the
re-identification scores, then node.audit.judge (docs/DESIGN.md 3.5).

Spaces: "pixel" (mean squared error on [0,1]), "phi_id" and "attacker" (squared Euclidean
distance between penultimate-layer embeddings of phi_id and of the independently trained
attacker), and "lpips" (exact LPIPS, node.audit.lpips_matrix) when the backbone weights are in the
model store; otherwise the report says why LPIPS is missing. Set-level figures take the worst
space.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
import torch.nn.functional as F

from common.config import PolicyConfig
from node.audit.copies import PIXEL_VIEW_SIZE, calibrate, copy_distances, embed_warp_family, warp_family
from node.audit.distances import embed, min_sq_dist, nearest_sq_fast, pixels01
from node.audit.figures import space_fn
from node.audit.judge import (
    HALVES_SEED,
    AttackSettings,
    Evidence,
    Records,
    halves_info,
    judge,
    patient_ids,
    top_prob,
)
from node.audit.lpips_matrix import MIN_SIDE, lpips_features, lpips_nearest, prepare
from node.audit.release_filter import distinct, holdout_halves
from node.plan.classifiers import SmallCNN

log = logging.getLogger(__name__)


def physical_memory_bytes() -> int:
    """This machine's RAM in bytes (POSIX sysconf)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def lpips_space(model, images: tuple[np.ndarray, np.ndarray, np.ndarray], *, max_bytes: int | None = None):
    """Nearest-neighbour function of the LPIPS space (node.audit.lpips_matrix). When the features of
    every image fit in `max_bytes` (default: a third of this machine's RAM; 127 KB an image at
    64x64, so 6.4 GB for 20,000 candidates, 20,000 train and 10,000 holdout images), each image's
    features are computed once and kept; beyond, every query runs lpips_nearest, whose reference
    blocks bound the memory but which recomputes the features of both sides each time."""
    by = dict(zip("sth", images))
    if max_bytes is None:
        max_bytes = physical_memory_bytes() // 3
    n = sum(len(v) for v in images)
    row_bytes = 4 * lpips_features(model, prepare(images[1][:1])).shape[1]  # a train image: never empty
    cached = n * row_bytes <= max_bytes
    feats = {k: lpips_features(model, prepare(v)) for k, v in by.items()} if cached else {}

    def nn(a, b, ia, ib):
        if len(ia) == 0:
            return np.zeros(0), np.zeros(0, dtype=int)
        if cached:
            d, j = nearest_sq_fast(feats[a][torch.from_numpy(ia)], feats[b][torch.from_numpy(ib)])
            return d.double().numpy(), j.numpy()
        return lpips_nearest(model, by[a][ia], by[b][ib])

    return nn


def features_embedder(model, device, *, batch_size: int = 1024):
    """An Embedder (node.audit.copies) from a network's `features`: float [B,1,H,W] -> [B,F], both on `device`."""
    model.to(device).eval()

    @torch.no_grad()
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [model.features(x[i : i + batch_size].to(device)).float() for i in range(0, len(x), batch_size)]
        )

    return f


def lpips_embedder(model):
    """An Embedder giving LPIPS features (node.audit.lpips_matrix): grey [-1,1] images upsampled as
    `prepare` does, computed on the model's device and returned on the input's."""

    def f(x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < MIN_SIDE:
            x = F.interpolate(x, scale_factor=MIN_SIDE / min(x.shape[-2:]), mode="bilinear", align_corners=False)
        return lpips_features(model, x.expand(-1, 3, -1, -1).contiguous()).to(x.device)

    return f


def audit_images(
    candidates: np.ndarray,
    train: np.ndarray,
    holdout: np.ndarray,
    *,
    phi_id,
    attacker,
    policy: PolicyConfig,
    device: torch.device | str,
    attacker_wide=None,
    seed: int = 0,
    train_ids: np.ndarray | None = None,
    holdout_ids: np.ndarray | None = None,
    candidate_labels: np.ndarray | None = None,
    train_labels: np.ndarray | None = None,
    holdout_labels: np.ndarray | None = None,
    paths: np.ndarray | None = None,
    discriminator=None,
    lpips_model=None,
    lpips_reason: str | None = None,
    dp_epsilon: float | None = None,
    n_boot: int = 200,
    downstream_epochs: int = 20,
    details: dict | None = None,
) -> tuple[dict, np.ndarray]:
    """Audit candidate images uint8 [S,H,W] (the PLAN route) against train and holdout images
    (with their patient ids; without, every image is its own patient).

    Optional parts: the second attacker `attacker_wide` (trained under wider edits and stronger
    noise; its features are one more copy-detection space), labels of all three sets (the
    downstream-model attack), each candidate's path (the report counts the distinct paths
    released), the GAN's `discriminator` (LOGAN), an `lpips_model` (node.audit.lpips_matrix.build_lpips;
    when None the report says why, from `lpips_reason`), a declared DP epsilon. `details`, when a
    dict, is filled with distances, scores and closest pairs for the HTML report.

    Returns (report dict as written to audit.json, boolean mask [S] of accepted candidates)."""
    S = len(candidates)
    train_ids, holdout_ids = patient_ids(train_ids, holdout_ids, len(train), len(holdout))
    cal, evl = holdout_halves(holdout_ids, seed=HALVES_SEED)

    # the copy detector: each space's threshold from the calibration half's own copy distances
    log.info(
        "audit: copy detector, %d calibration and %d candidate images against %d train images", len(cal), S, len(train)
    )
    embedders = {"attacker": features_embedder(attacker, device)}
    if attacker_wide is not None:
        embedders["attacker_wide"] = features_embedder(attacker_wide, device)
    if lpips_model is not None:
        embedders["lpips"] = lpips_embedder(lpips_model)
    family = warp_family(size=min(train.shape[-1], PIXEL_VIEW_SIZE))
    chunk = 4 if lpips_model is not None else 32  # LPIPS feature rows are ~100x wider
    if torch.device(device).type == "cuda":
        chunk *= 8  # a few hundred thousand warped images per product keep a GPU busy
    copies_on = {"embedders": embedders, "family": family, "chunk": chunk, "device": device}
    on = policy.copy_fpr > 0
    d_cal = copy_distances(holdout[cal], train, **copies_on) if on else {}
    thresholds = {k: calibrate(d, fpr=policy.copy_fpr) for k, (d, _) in d_cal.items()}

    d_cand = copy_distances(candidates, train, **copies_on) if thresholds and S else {}
    copies = {k: (d_cand[k][0] < t if S else np.zeros(0, dtype=bool)) for k, t in thresholds.items()}
    calibration = {
        **halves_info(holdout_ids, cal, evl),
        "copy_fpr": policy.copy_fpr,
        "copy_family": len(family) if on else 0,
        "copy_family_embeddings": len(embed_warp_family()) if on else 0,
        "copy_thresholds": thresholds,
        # real non-members the detector would flag: more than copy_fpr of them means near-duplicates across
        # patients in the data
        "copy_calibration_flagged": {k: int((d_cal[k][0] < t).sum()) for k, t in thresholds.items()},
    }
    h_cal, h_eval = holdout[cal], holdout[evl]
    pix_s, pix_t, pix_e = pixels01(candidates), pixels01(train), pixels01(h_eval)
    d_pix_train = (min_sq_dist(pix_s, pix_t)[0] / pix_s.shape[1]).numpy() if S else np.zeros(0)
    empty = torch.zeros(0, 1)
    emb = {
        name: (
            embed(m, candidates, device=device) if S else empty,
            embed(m, train, device=device),
            embed(m, h_eval, device=device),
        )
        for name, m in (("phi_id", phi_id), ("attacker", attacker))
    }
    spaces = {"pixel": space_fn((pix_s, pix_t, pix_e), scale=pix_s.shape[1])}
    spaces.update({k: space_fn(v) for k, v in emb.items()})
    if lpips_model is not None:
        spaces["lpips"] = lpips_space(lpips_model, (candidates, train, h_eval))
    ev = Evidence(
        spaces=spaces,
        attack_features=(
            emb["attacker"][0].numpy(),
            emb["attacker"][1].numpy(),
            embed(attacker, h_cal, device=device).numpy(),
            emb["attacker"][2].numpy(),
        ),
        closeness=d_pix_train,
        closeness_key="min_pixel_mse_to_train",
        too_close=d_pix_train < policy.min_pixel_distance,
        copies=copies,
        calibration=calibration,
        distinct=distinct(candidates),
        id_score=top_prob(phi_id, candidates, device),
        id_cal=top_prob(phi_id, h_cal, device),
        id_eval=top_prob(phi_id, h_eval, device),
        att_score=top_prob(attacker, candidates, device),
        att_cal=top_prob(attacker, h_cal, device),
        att_eval=top_prob(attacker, h_eval, device),
    )
    records = Records(
        candidates,
        train,
        h_eval,
        train_ids,
        holdout_ids[evl],
        candidate_labels=candidate_labels,
        train_labels=train_labels,
        eval_labels=None if holdout_labels is None else np.asarray(holdout_labels)[evl],
        paths=paths,
    )
    attacks = AttackSettings(
        make_classifier=lambda n, _: SmallCNN(n, width=8, image_size=candidates.shape[-1]),
        augment="light",
        device=device,
        seed=seed,
        n_boot=n_boot,
        downstream_epochs=downstream_epochs,
        discriminator=discriminator,
    )
    lpips_info = {"reason": lpips_reason} if lpips_model is None else {"net": getattr(lpips_model, "pnet_type", None)}
    extra = {"route": "plan", "lpips": {"available": lpips_model is not None, **lpips_info}}
    return judge(ev, records, policy, attacks, dp_epsilon=dp_epsilon, extra=extra, details=details)
