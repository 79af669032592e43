"""The audit of candidate embeddings (the CVAE route): one standardised embedding space, a
relative per-sample minimum distance, the re-identification heads' scores, then
node.audit.judge (docs/DESIGN.md 3.5)."""

from __future__ import annotations

import numpy as np
import torch

from common.config import PolicyConfig
from common.models import EmbeddingHead
from node.audit.distances import min_sq_dist
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
from node.audit.release_filter import distinct, holdout_halves


def standardise(train: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    """Every array [*,D] scaled per dimension by train's mean and standard deviation: distances in
    an embedding space then weigh every dimension alike, whatever its raw scale."""
    t = torch.as_tensor(np.asarray(train), dtype=torch.float32)
    mu, sd = t.mean(0), t.std(0).clamp_min(1e-6)
    return [(torch.as_tensor(np.asarray(a), dtype=torch.float32) - mu) / sd for a in (train, *others)]


def audit_embeddings(
    candidates: np.ndarray,
    train: np.ndarray,
    holdout: np.ndarray,
    *,
    phi_id,
    attacker,
    policy: PolicyConfig,
    device: torch.device | str,
    seed: int = 0,
    train_ids: np.ndarray | None = None,
    holdout_ids: np.ndarray | None = None,
    candidate_labels: np.ndarray | None = None,
    train_labels: np.ndarray | None = None,
    holdout_labels: np.ndarray | None = None,
    dp_epsilon: float | None = None,
    n_boot: int = 200,
    downstream_epochs: int = 20,
    details: dict | None = None,
) -> tuple[dict, np.ndarray]:
    """Audit candidate embeddings float [S,D] (the CVAE route) against the train and holdout
    records' embeddings [N,D], [M,D] from the same extractor. phi_id and the attacker are
    re-identification heads on embeddings (common.models.EmbeddingHead over the train patients).

    The distance space is the embedding itself, standardised by train. The per-sample minimum is
    relative, because an embedding's scale is the extractor's: a candidate is too close when its
    distance to the nearest train record is below policy.min_embedding_distance_ratio times the
    median distance from a calibration-half holdout record (a real non-member) to its nearest
    train record. Returns (report, accepted mask [S]) as audit_images."""
    S = len(candidates)
    train_ids, holdout_ids = patient_ids(train_ids, holdout_ids, len(train), len(holdout))
    cal, evl = holdout_halves(holdout_ids, seed=HALVES_SEED)
    t, s, hc, he = standardise(
        train, candidates if S else np.zeros((0, train.shape[1]), np.float32), holdout[cal], holdout[evl]
    )
    # Euclidean, not squared, so the ratio reads as "this far, relative to a real non-member"
    d_s = min_sq_dist(s, t)[0].sqrt().numpy() if S else np.zeros(0)
    typical = float(min_sq_dist(hc, t)[0].sqrt().median())
    ratio = d_s / max(typical, 1e-12)
    ev = Evidence(
        spaces={"embedding": space_fn((s, t, he))},
        attack_features=(s.numpy(), t.numpy(), hc.numpy(), he.numpy()),
        closeness=ratio,
        closeness_key="min_embedding_distance_ratio",
        too_close=ratio < policy.min_embedding_distance_ratio,
        copies={},
        calibration={**halves_info(holdout_ids, cal, evl), "median_holdout_distance": typical},
        distinct=distinct(np.asarray(candidates), near_mse=None),
        id_score=top_prob(phi_id, candidates, device),
        id_cal=top_prob(phi_id, holdout[cal], device),
        id_eval=top_prob(phi_id, holdout[evl], device),
        att_score=top_prob(attacker, candidates, device),
        att_cal=top_prob(attacker, holdout[cal], device),
        att_eval=top_prob(attacker, holdout[evl], device),
    )
    d = train.shape[1]
    records = Records(
        candidates,
        train,
        holdout[evl],
        train_ids,
        holdout_ids[evl],
        candidate_labels=candidate_labels,
        train_labels=train_labels,
        eval_labels=None if holdout_labels is None else np.asarray(holdout_labels)[evl],
    )
    attacks = AttackSettings(
        make_classifier=lambda n, s_data: EmbeddingHead(d, n).fit_scaler(torch.from_numpy(s_data)),
        augment="none",
        device=device,
        seed=seed,
        n_boot=n_boot,
        downstream_epochs=downstream_epochs,
        attack_space="embedding",
    )
    extra = {"route": "cvae", "median_holdout_distance": typical}
    return judge(ev, records, policy, attacks, dp_epsilon=dp_epsilon, extra=extra, details=details)
