"""Stage `audit`: membership-inference and re-identification attacks on the latest synthetic
run, the per-sample filter and the release gate (DESIGN.md section 5).

Spaces: "pixel" (mean squared error on [0,1]), "phi_id" and "attacker" (squared Euclidean
distance between penultimate-layer embeddings of phi_id and of the independently trained
attacker). Set-level figures take the worst space.

Gate: (1) drop each candidate whose pixel MSE to its nearest train image is below
policy.min_pixel_distance, or that phi_id re-identifies (top-class probability above the 95th
percentile of the same score on holdout images); (2) on the accepted set recompute the
membership attack AUC, the share closer to train than to holdout, and the re-identification rate
judged by the attacker (which the walk never optimised against, so it is not fooled by
construction; 0.05 is what a set unrelated to the train patients scores); (3) all checks of
the policy must pass, including n_accepted >= min_accepted.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from common.config import PolicyConfig
from common.fileio import atomic_write_bytes, atomic_write_json
from node.device import pick_device
from node.distances import embed, min_sq_dist, pixels01
from node.ingest import load_split
from node.synthesize import latest_run
from node.task import predict_logits
from node.train import load_model
from node.workspace import Workspace

REID_QUANTILE = 0.95


# ---------------------------------------------------------------- pure figures


def roc_auc(scores_pos: np.ndarray, scores_neg: np.ndarray) -> float:
    """Area under the ROC curve for telling positives (higher score) from negatives: the
    Mann-Whitney probability that a random positive outscores a random negative, ties half."""
    pos, neg = np.asarray(scores_pos, dtype=np.float64), np.asarray(scores_neg, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(avg, counts)
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def tpr_at_fpr(scores_pos: np.ndarray, scores_neg: np.ndarray, fpr: float) -> float:
    """True-positive rate at the strictest threshold whose false-positive rate is <= fpr
    (a positive is flagged when its score is strictly above the threshold)."""
    pos, neg = np.asarray(scores_pos, dtype=np.float64), np.asarray(scores_neg, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    neg_sorted = np.sort(neg)[::-1]
    allowed = int(np.floor(fpr * len(neg)))  # negatives that may lie above the threshold
    thr = neg_sorted[allowed] if allowed < len(neg) else -np.inf
    return float((pos > thr).mean())


def reid_threshold(holdout_scores: np.ndarray, *, quantile: float = REID_QUANTILE) -> float:
    return float(np.quantile(np.asarray(holdout_scores, dtype=np.float64), quantile))


def reid_rate(scores: np.ndarray, threshold: float) -> float:
    """Share of samples whose identity score is above `threshold` (nan for an empty set)."""
    scores = np.asarray(scores)
    return float((scores > threshold).mean()) if len(scores) else float("nan")


def nearest_record(d_train: np.ndarray, d_holdout: np.ndarray) -> dict:
    """From per-sample nearest distances to train [S] and to holdout [S] (a holdout-sized
    train sample, so 0.5 is ideal): share closer to train, mean and minimum distance."""
    if len(d_train) == 0:
        return {"closer_to_train": float("nan"), "mean_min_train": float("nan"), "min_train": float("nan"), "mean_min_holdout": float("nan")}
    return {
        "closer_to_train": float((d_train < d_holdout).mean() + 0.5 * (d_train == d_holdout).mean()),
        "mean_min_train": float(np.mean(d_train)),
        "min_train": float(np.min(d_train)),
        "mean_min_holdout": float(np.mean(d_holdout)),
    }


def membership_attack(s: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> dict:
    """GAN-Leaks-style black-box attack: score each record x of train t [N,D] (members) and
    holdout h [M,D] (non-members) by -min_s d(x,s) over the synthetic set s [S,D]."""
    if len(s) == 0:
        return {"auc": float("nan"), "tpr_at_1pct_fpr": float("nan"), "tpr_at_0.1pct_fpr": float("nan")}
    pos, neg = -min_sq_dist(t, s)[0].numpy(), -min_sq_dist(h, s)[0].numpy()
    return {"auc": roc_auc(pos, neg), "tpr_at_1pct_fpr": tpr_at_fpr(pos, neg, 0.01), "tpr_at_0.1pct_fpr": tpr_at_fpr(pos, neg, 0.001)}


def balanced_sample(train_ids: np.ndarray | None, holdout_ids: np.ndarray | None, *, seed: int) -> np.ndarray:
    """Indices of a train sample shaped like the holdout set: as many train *patients* as there
    are holdout patients, with all their images. Balancing images alone is not enough: a
    sample of 84 images from 30 patients covers more anatomy than 84 images of 14 patients,
    and its nearest neighbour is closer to anything, member or not."""
    if train_ids is None or holdout_ids is None:
        raise ValueError("train_ids and holdout_ids are required")
    patients = np.unique(train_ids)
    n = min(len(patients), len(np.unique(holdout_ids)))
    keep = np.random.default_rng(seed).permutation(patients)[:n]
    return np.flatnonzero(np.isin(train_ids, keep))


def set_figures(spaces: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], t_balanced: np.ndarray) -> dict:
    """Per space (name -> (S, T, H) feature matrices): nearest-record and membership figures.
    `t_balanced` indexes a holdout-shaped sample of T (balanced_sample) for the closer-to-train share."""
    out = {}
    for name, (s, t, h) in spaces.items():
        scale = s.shape[1] if name == "pixel" else 1  # pixel distances as MSE
        if len(s):
            d_t = (min_sq_dist(s, t[t_balanced])[0] / scale).numpy()
            d_h = (min_sq_dist(s, h)[0] / scale).numpy()
        else:
            d_t = d_h = np.zeros(0)
        out[name] = {"nearest_record": nearest_record(d_t, d_h), "membership": membership_attack(s, t, h)}
    return out


def _worst(figs: dict, key: str, sub: str) -> float:
    vals = [f[key][sub] for f in figs.values()]
    return float("nan") if any(np.isnan(v) for v in vals) else float(max(vals))


def gate(figs: dict, reid: float, n_accepted: int, policy: PolicyConfig) -> tuple[bool, list[dict]]:
    """The set-level checks of the policy; nan figures (an empty set) fail."""
    checks = [
        ("mia_auc", _worst(figs, "membership", "auc"), policy.max_mia_auc, "max"),
        ("reid_rate", reid, policy.max_reid_rate, "max"),
        ("closer_to_train", _worst(figs, "nearest_record", "closer_to_train"), policy.max_closer_to_train, "max"),
        ("n_accepted", float(n_accepted), float(policy.min_accepted), "min"),
    ]
    out = []
    for name, value, thr, kind in checks:
        ok = (not np.isnan(value)) and (value <= thr if kind == "max" else value >= thr)
        out.append({"name": name, "value": None if np.isnan(value) else value, "threshold": thr, "kind": kind, "passed": bool(ok)})
    return all(c["passed"] for c in out), out


# ---------------------------------------------------------------- the stage


def _top_prob(model, images: np.ndarray, device) -> np.ndarray:
    if len(images) == 0:
        return np.zeros(0)
    return torch.softmax(predict_logits(model, images, device=device), 1).max(1).values.numpy()


def audit_images(
    candidates: np.ndarray, train: np.ndarray, holdout: np.ndarray, *,
    phi_id, attacker, policy: PolicyConfig, device: torch.device | str, seed: int = 0,
    train_ids: np.ndarray | None = None, holdout_ids: np.ndarray | None = None,
) -> tuple[dict, np.ndarray]:
    """Audit candidate images uint8 [S,H,W] against train and holdout images (with their
    patient ids; without, every image is its own patient).

    Returns (report dict as written to audit.json, boolean mask [S] of accepted candidates)."""
    S = len(candidates)
    train_ids = np.arange(len(train)).astype(str) if train_ids is None else np.asarray(train_ids)
    holdout_ids = np.array([f"h{i}" for i in range(len(holdout))]) if holdout_ids is None else np.asarray(holdout_ids)
    # per-sample filter
    pix_s, pix_t, pix_h = pixels01(candidates), pixels01(train), pixels01(holdout)
    d_pix_train = (min_sq_dist(pix_s, pix_t)[0] / pix_s.shape[1]).numpy() if S else np.zeros(0)
    thr_id = reid_threshold(_top_prob(phi_id, holdout, device))
    id_score = _top_prob(phi_id, candidates, device)
    too_close = d_pix_train < policy.min_pixel_distance
    reidentified = id_score > thr_id
    accepted = ~too_close & ~reidentified

    thr_att = reid_threshold(_top_prob(attacker, holdout, device))
    att_score = _top_prob(attacker, candidates, device)

    emb = {name: (embed(m, candidates, device=device) if S else torch.zeros(0, 1), embed(m, train, device=device), embed(m, holdout, device=device))
           for name, m in (("phi_id", phi_id), ("attacker", attacker))}
    spaces_all = {"pixel": (pix_s, pix_t, pix_h), **emb}
    spaces_acc = {k: (s[torch.from_numpy(accepted)] if S else s, t, h) for k, (s, t, h) in spaces_all.items()}
    t_bal = balanced_sample(train_ids, holdout_ids, seed=seed)

    figs_all = set_figures(spaces_all, t_bal)
    figs_acc = set_figures(spaces_acc, t_bal)
    reid_acc = reid_rate(att_score[accepted], thr_att)
    n_acc = int(accepted.sum())
    passed, checks = gate(figs_acc, reid_acc, n_acc, policy)
    report = {
        "passed": passed,
        "checks": checks,
        "mia_auc": _worst(figs_acc, "membership", "auc"),
        "reid_rate": reid_acc,
        "closer_to_train": _worst(figs_acc, "nearest_record", "closer_to_train"),
        "n_candidates": S,
        "n_accepted": n_acc,
        "dropped": {"too_close": int(too_close.sum()), "reidentified": int(reidentified.sum()), "either": int((~accepted).sum())},
        "policy": policy.model_dump(mode="json"),
        "nearest_record": {k: v["nearest_record"] for k, v in figs_acc.items()},
        "membership": {k: v["membership"] for k, v in figs_acc.items()},
        "candidates": {
            "nearest_record": {k: v["nearest_record"] for k, v in figs_all.items()},
            "membership": {k: v["membership"] for k, v in figs_all.items()},
            "reid_rate_phi_id": reid_rate(id_score, thr_id),
            "reid_rate_attacker": reid_rate(att_score, thr_att),
            "min_pixel_mse_to_train": float(d_pix_train.min()) if S else None,
        },
        "reid_thresholds": {"phi_id": thr_id, "attacker": thr_att, "quantile": REID_QUANTILE},
        "n_train": len(train),
        "n_holdout": len(holdout),
    }
    return report, accepted


def _nan_to_none(x):
    if isinstance(x, float) and np.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def audit(ws: Workspace, *, policy: PolicyConfig | None = None) -> dict:
    """Audit synth/<latest run>/candidates.npz; write audit.json and accepted.npz beside it.

    `policy` defaults to the site's; pass the site's policy tightened by the federation floor
    (PolicyConfig.stricter) to audit for release into a federation."""
    cfg = ws.config()
    policy = policy or cfg.policy
    device = pick_device(cfg.device)
    run_id = latest_run(ws)
    run_dir = ws.synth / run_id
    with np.load(run_dir / "candidates.npz", allow_pickle=False) as z:
        cand = {k: z[k] for k in ("images", "labels", "path")}
    train, holdout = load_split(ws, "train"), load_split(ws, "holdout")
    report, accepted = audit_images(
        cand["images"], train.images, holdout.images,
        phi_id=load_model(ws, "phi_id", device), attacker=load_model(ws, "phi_attack", device),
        policy=policy, device=device, seed=cfg.synth.seed, train_ids=train.patient_ids, holdout_ids=holdout.patient_ids,
    )
    report = _nan_to_none({"run_id": run_id, **report})
    buf = io.BytesIO()
    np.savez(buf, **{k: v[accepted] for k, v in cand.items()})
    atomic_write_bytes(run_dir / "accepted.npz", buf.getvalue())
    atomic_write_json(run_dir / "audit.json", report)
    return report
