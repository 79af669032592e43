"""The audit's figures, as pure functions of scores and distances: ROC AUC and TPR at a low FPR
with patient-level bootstrap intervals, nearest-record shares, re-identification rates, and the
nearest-neighbour functions of a feature space (docs/DESIGN.md 3.5)."""

from __future__ import annotations

import numpy as np
import torch

from common.metrics import roc_auc
from node.audit.attacks import bootstrap_ci, roc_points
from node.audit.distances import min_sq_dist

REID_QUANTILE = 0.95


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
        return {
            "closer_to_train": float("nan"),
            "mean_min_train": float("nan"),
            "min_train": float("nan"),
            "mean_min_holdout": float("nan"),
        }
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
    return {
        "auc": roc_auc(pos, neg),
        "tpr_at_1pct_fpr": tpr_at_fpr(pos, neg, 0.01),
        "tpr_at_0.1pct_fpr": tpr_at_fpr(pos, neg, 0.001),
    }


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


def space_fn(feats: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *, scale: float = 1.0):
    """Nearest-neighbour function of a feature space: nn(a, b, ia, ib) with a, b in "s", "t", "h"
    and index arrays into them -> (squared distance / scale [len(ia)] float64, index into ib)."""
    by = dict(zip("sth", feats))

    def nn(a, b, ia, ib):
        if len(ia) == 0:
            return np.zeros(0), np.zeros(0, dtype=int)
        d, j = min_sq_dist(by[a][torch.from_numpy(ia)], by[b][torch.from_numpy(ib)])
        return (d / scale).numpy(), j.numpy()

    return nn


def memo_rows(nn):
    """`nn` (see space_fn) that keeps its answers per (a, b, ib) and query row: asked again for
    the same references, it searches only the rows it has not answered yet. The audit asks for the
    accepted candidates and then for every distinct one, so the second search covers only the
    rejected rows."""
    known: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # key -> (answered, d, j), by row of a

    def remembered(a, b, ia, ib):
        ia = np.asarray(ia)
        key = (a, b, np.asarray(ib).tobytes())
        if len(ia) == 0:
            return nn(a, b, ia, ib)
        if key in known:
            done, d, j = known[key]
            n = max(len(done), int(ia.max()) + 1)
            done, d, j = (np.concatenate([x, np.zeros(n - len(x), x.dtype)]) for x in (done, d, j))
            new = np.unique(ia[~done[ia]])
            if len(new):
                d[new], j[new] = nn(a, b, new, ib)
        else:
            new = np.unique(ia)
            got_d, got_j = nn(a, b, new, ib)
            n = int(new[-1]) + 1
            done, d, j = np.zeros(n, bool), np.zeros(n, got_d.dtype), np.zeros(n, got_j.dtype)
            d[new], j[new] = got_d, got_j
        done[new] = True
        known[key] = (done, d, j)
        return d[ia], j[ia]

    return remembered


def auc_block(
    pos: np.ndarray,
    neg: np.ndarray,
    pos_groups: np.ndarray,
    neg_groups: np.ndarray,
    *,
    n_boot: int,
    seed: int,
    roc: bool = True,
) -> dict:
    """AUC, TPR at 1% and 0.1% FPR with patient-level bootstrap intervals, and ROC points."""
    pg, ng = (pos, pos_groups), (neg, neg_groups)
    out = {
        "auc": roc_auc(pos, neg),
        "auc_ci": bootstrap_ci(roc_auc, [pg, ng], n=n_boot, seed=seed),
        "tpr_at_1pct_fpr": tpr_at_fpr(pos, neg, 0.01),
        "tpr_at_1pct_fpr_ci": bootstrap_ci(lambda p, n: tpr_at_fpr(p, n, 0.01), [pg, ng], n=n_boot, seed=seed),
        "tpr_at_0.1pct_fpr": tpr_at_fpr(pos, neg, 0.001),
        "tpr_at_0.1pct_fpr_ci": bootstrap_ci(lambda p, n: tpr_at_fpr(p, n, 0.001), [pg, ng], n=n_boot, seed=seed),
        "n_members": int(len(pos)),
        "n_nonmembers": int(len(neg)),
        # every score equal (e.g. an embedding whose ReLU features are all 0): AUC 0.5 by ties
        # alone, which says nothing about privacy; flagged so a reader does not take it as ideal
        "degenerate": bool(len(pos) and len(neg) and np.ptp(np.concatenate([pos, neg])) == 0),
    }
    if roc:
        out["roc"] = roc_points(pos, neg)
    return out


def set_figures(
    spaces: dict,
    t_balanced: np.ndarray,
    s_idx: np.ndarray,
    *,
    n_t: int,
    n_h: int,
    train_ids: np.ndarray,
    holdout_ids: np.ndarray,
    n_boot: int = 200,
    seed: int = 0,
    details: dict | None = None,
) -> dict:
    """Per space (name -> nn function, see space_fn): nearest-record and black-box membership
    figures of the synthetic records `s_idx`, with bootstrap intervals. `t_balanced` indexes a
    holdout-shaped sample of T (balanced_sample) for the closer-to-train share. Distances and
    closest pairs go into `details` (for the HTML report), not into the figures."""
    out = {}
    all_t, all_h = np.arange(n_t), np.arange(n_h)
    for name, nn in spaces.items():
        if len(s_idx) == 0:
            nan = float("nan")
            out[name] = {
                "nearest_record": nearest_record(np.zeros(0), np.zeros(0)),
                "membership": {"auc": nan, "tpr_at_1pct_fpr": nan, "tpr_at_0.1pct_fpr": nan},
            }
            continue
        d_t, j_t = nn("s", "t", s_idx, t_balanced)
        d_h, _ = nn("s", "h", s_idx, all_h)
        nr = nearest_record(d_t, d_h)
        recs = np.arange(len(s_idx))
        nr["closer_to_train_ci"] = bootstrap_ci(
            lambda i, d_t=d_t, d_h=d_h: float((d_t[i] < d_h[i]).mean() + 0.5 * (d_t[i] == d_h[i]).mean()),
            [(recs, recs)],
            n=n_boot,
            seed=seed,
        )
        nr["mean_min_train_ci"] = bootstrap_ci(np.mean, [(d_t, recs)], n=n_boot, seed=seed)
        pos, neg = -nn("t", "s", all_t, s_idx)[0], -nn("h", "s", all_h, s_idx)[0]
        out[name] = {
            "nearest_record": nr,
            "membership": auc_block(pos, neg, train_ids, holdout_ids, n_boot=n_boot, seed=seed),
        }
        if details is not None:
            order = np.argsort(d_t)[:8]
            details[name] = {
                "d_s_train": d_t,
                "d_s_holdout": d_h,
                "member_scores": pos,
                "nonmember_scores": neg,
                "closest": [(int(s_idx[i]), int(t_balanced[j_t[i]]), float(d_t[i])) for i in order],
            }
    return out


def worst(figs: dict, key: str, sub: str) -> float:
    """The largest figures[space][key][sub] over the spaces; nan if any is nan."""
    return max_or_nan([f[key][sub] for f in figs.values()])


def reid_block(s_scores: np.ndarray, h_scores: np.ndarray, holdout_ids: np.ndarray, *, n_boot: int, seed: int) -> dict:
    """Re-id rate of synthetic scores against the 95th percentile of holdout scores, with an
    interval resampling both the synthetic records and the holdout patients (the threshold moves too)."""
    rate = reid_rate(s_scores, reid_threshold(h_scores)) if len(h_scores) else float("nan")
    ci = bootstrap_ci(
        lambda s, h: reid_rate(s, reid_threshold(h)),
        [(s_scores, np.arange(len(s_scores))), (h_scores, holdout_ids)],
        n=n_boot,
        seed=seed,
    )
    return {"rate": rate, "rate_ci": ci, "threshold": reid_threshold(h_scores), "quantile": REID_QUANTILE}


def max_or_nan(vals: list[float]) -> float:
    return float("nan") if not vals or any(np.isnan(v) for v in vals) else float(max(vals))


def upper(ci, point: float) -> float:
    """The upper end of an interval, nan where it is undefined."""
    return float("nan") if ci is None or ci[1] is None or np.isnan(point) else float(ci[1])
