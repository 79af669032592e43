"""Stage `audit`: membership-inference and re-identification attacks on the latest synthetic
run, the per-sample filter and the release gate (docs/DESIGN.md 3.5).

Spaces: "pixel" (mean squared error on [0,1]), "phi_id" and "attacker" (squared Euclidean
distance between penultimate-layer embeddings of phi_id and of the independently trained
attacker), and "lpips" (exact LPIPS, node.audit.lpips_matrix) when the backbone weights are in the
model store; otherwise the report says why LPIPS is missing. Set-level figures take the worst
space.

Attacks on the released set: black-box nearest neighbour per space (AUC, TPR at 1% and 0.1%
FPR, ROC), DOMIAS density ratio in the attacker's embedding, and a loss-threshold attack on a
classifier trained on the set. `mia_auc` is the worst of them. LOGAN (the GAN's discriminator)
is reported, not gated. Every figure has a 95% bootstrap interval (patients resampled for T and
H, records for the synthetic set).

The holdout is split by patient (node.audit.release_filter.holdout_halves): its calibration half sets
every per-sample threshold and is the DOMIAS reference; its evaluation half is where the set-level
figures are measured.

Gate: (1) keep distinct candidates only (bitwise or near-identical renders count once); drop each
candidate that is an edited copy of a train image (node.audit.copies: the minimum distance over a family
of shifts, flips, rotations and zooms, in normalised pixels, blurred normalised pixels, the
attacker's embedding, the second attacker's (phi_attack_wide, trained under wider edits and
stronger noise, so a noisy or far-moved copy stays near its source) and LPIPS when present, each
below the `policy.copy_fpr` point of real non-members' distances), whose plain pixel MSE to a train image is below
policy.min_pixel_distance, that phi_id re-identifies (top-class probability above the 95th
percentile of calibration-half scores), or that the independent attacker re-identifies (above its
1 - copy_fpr point); (2) on the accepted set, every set-level figure with a 95% bootstrap
interval on the evaluation half; (3) common.policy.evaluate judges each estimated figure at the
unfavourable end of its interval, fails a degenerate attack space, and needs
n_accepted >= min_accepted (distinct images).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass

import numpy as np
import torch

from common.config import PolicyConfig
from common.fileio import atomic_write_bytes, atomic_write_json
from common.metrics import roc_auc
from common.models import EmbeddingHead
from common.policy import evaluate
from node.audit.attacks import bootstrap_ci, density_ratio_scores, discriminator_scores, downstream_scores, roc_points
from node.audit.copies import PIXEL_VIEW_SIZE, calibrate, copy_distances, embed_warp_family, warp_family
from node.audit.distances import embed, min_sq_dist, nearest_sq, pixels01
from node.audit.lpips_matrix import lpips_features, lpips_nearest, prepare
from node.audit.release_filter import distinct, holdout_halves
from node.federation.task import predict_logits
from node.plan.classifiers import SmallCNN
from node.plan.train import load_model
from node.site.device import pick_device
from node.site.ingest import load_split
from node.site.workspace import Workspace

REID_QUANTILE = 0.95
# The holdout's halves do not move with synth.seed: retrying with new seeds cannot shop for a lucky split.
HALVES_SEED = 0

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- pure figures


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


def _space_fn(feats: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *, scale: float = 1.0):
    """Nearest-neighbour function of a feature space: nn(a, b, ia, ib) with a, b in "s", "t", "h"
    and index arrays into them -> (squared distance / scale [len(ia)] float64, index into ib)."""
    by = dict(zip("sth", feats))

    def nn(a, b, ia, ib):
        if len(ia) == 0:
            return np.zeros(0), np.zeros(0, dtype=int)
        d, j = min_sq_dist(by[a][torch.from_numpy(ia)], by[b][torch.from_numpy(ib)])
        return (d / scale).numpy(), j.numpy()

    return nn


def _lpips_fn(model, images: tuple[np.ndarray, np.ndarray, np.ndarray], *, max_cached: int = 8192):
    """Nearest-neighbour function of the LPIPS space (node.audit.lpips_matrix). Up to `max_cached`
    images in all (~1 GB of AlexNet features at 64x64), each image's features are computed once
    and kept; beyond, every query runs lpips_nearest, whose reference blocks bound the memory."""
    by = dict(zip("sth", images))
    cached = sum(len(v) for v in images) <= max_cached
    feats = {k: lpips_features(model, prepare(v)) for k, v in by.items()} if cached else {}

    def nn(a, b, ia, ib):
        if len(ia) == 0:
            return np.zeros(0), np.zeros(0, dtype=int)
        if cached:
            d, j = nearest_sq(feats[a][torch.from_numpy(ia)], feats[b][torch.from_numpy(ib)])
            return d.double().numpy(), j.numpy()
        return lpips_nearest(model, by[a][ia], by[b][ib])

    return nn


def _auc_block(
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
    """Per space (name -> nn function, see _space_fn): nearest-record and black-box membership
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
            "membership": _auc_block(pos, neg, train_ids, holdout_ids, n_boot=n_boot, seed=seed),
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


def _worst(figs: dict, key: str, sub: str) -> float:
    vals = [f[key][sub] for f in figs.values()]
    return float("nan") if not vals or any(np.isnan(v) for v in vals) else float(max(vals))


def gate(report: dict, policy: PolicyConfig) -> tuple[bool, list[dict]]:
    """The set-level checks of the policy on the report's top-level figures (common.policy:
    the same function the coordinator applies to a received bundle); nan or missing figures fail."""
    checks = evaluate(nan_to_none(report), policy)
    return all(c["passed"] for c in checks), checks


# ---------------------------------------------------------------- the stage


def _top_prob(model, images: np.ndarray, device) -> np.ndarray:
    if len(images) == 0:
        return np.zeros(0)
    return torch.softmax(predict_logits(model, images, device=device), 1).max(1).values.numpy()


def _reid_block(s_scores: np.ndarray, h_scores: np.ndarray, holdout_ids: np.ndarray, *, n_boot: int, seed: int) -> dict:
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


@dataclass
class Evidence:
    """What a route's audit measured before judging the set. Holdout arrays are split into the
    calibration half (`*_cal`: thresholds) and the evaluation half (`*_eval`: set-level figures)."""

    spaces: dict  # name -> nearest-neighbour function over (S, T, H_eval) (see _space_fn)
    attack_features: tuple[
        np.ndarray, np.ndarray, np.ndarray, np.ndarray
    ]  # S, T, H_cal, H_eval in the space DOMIAS attacks
    closeness: np.ndarray  # float [S]: per sample, the figure the policy's per-sample minimum applies to
    closeness_key: str  # the report key of its minimum over the released set
    too_close: np.ndarray  # bool [S]: below the policy's per-sample minimum
    copies: dict  # space -> bool [S]: an edited copy of a train image in that space (node.audit.copies)
    calibration: dict  # thresholds and what they were set on, for the report
    distinct: np.ndarray  # bool [S]: the first of each group of duplicate candidates
    id_score: np.ndarray  # [S] phi_id's top-class probability; id_cal [A], id_eval [B] the same on the halves
    id_cal: np.ndarray
    id_eval: np.ndarray
    att_score: np.ndarray  # [S] the independent attacker's; att_cal [A], att_eval [B]
    att_cal: np.ndarray
    att_eval: np.ndarray


def _max_or_nan(vals: list[float]) -> float:
    return float("nan") if not vals or any(np.isnan(v) for v in vals) else float(max(vals))


def _upper(ci, point: float) -> float:
    """The upper end of an interval, nan where it is undefined."""
    return float("nan") if ci is None or ci[1] is None or np.isnan(point) else float(ci[1])


def _judge(
    ev: Evidence,
    *,
    candidates: np.ndarray,
    train: np.ndarray,
    holdout_eval: np.ndarray,
    policy: PolicyConfig,
    train_ids: np.ndarray,
    eval_ids: np.ndarray,
    candidate_labels,
    train_labels,
    eval_labels,
    paths,
    make_classifier,
    augment: str,
    discriminator,
    dp_epsilon,
    device,
    seed: int,
    n_boot: int,
    downstream_epochs: int,
    details: dict | None,
    extra: dict,
) -> tuple[dict, np.ndarray]:
    """The per-sample filter, every set-level figure on the accepted set and the gate: the part of
    the audit both routes share. Returns (report, accepted mask [S])."""
    S = len(candidates)
    thr_id = reid_threshold(ev.id_cal)
    thr_att = reid_threshold(ev.att_cal, quantile=1 - policy.copy_fpr)
    reid_id, reid_att = ev.id_score > thr_id, ev.att_score > thr_att
    copy_any = np.zeros(S, dtype=bool)
    for flags in ev.copies.values():
        copy_any |= flags
    accepted = ev.distinct & ~ev.too_close & ~copy_any & ~reid_id & ~reid_att
    acc_idx, all_idx = np.flatnonzero(accepted), np.flatnonzero(ev.distinct)
    t_bal = balanced_sample(train_ids, eval_ids, seed=seed)
    kw = {
        "n_t": len(train),
        "n_h": len(holdout_eval),
        "train_ids": train_ids,
        "holdout_ids": eval_ids,
        "n_boot": n_boot,
        "seed": seed,
    }
    figs_acc = set_figures(ev.spaces, t_bal, acc_idx, details=details, **kw)
    figs_all = set_figures(ev.spaces, t_bal, all_idx, **{**kw, "n_boot": 0}) if S else figs_acc
    n_acc = int(accepted.sum())

    # attacks on the released (accepted) set beyond the nearest-neighbour one
    log.info("audit: attacks on the %d accepted records (%d bootstrap resamples)", n_acc, n_boot)
    attacks: dict = {}
    if n_acc >= 2:
        s_e, t_e, hc_e, he_e = ev.attack_features
        pos, neg = density_ratio_scores(s_e[acc_idx], t_e, he_e, reference=hc_e)
        attacks["density_ratio"] = {
            "space": extra.get("attack_space", "attacker"),
            **_auc_block(pos, neg, train_ids, eval_ids, n_boot=n_boot, seed=seed),
        }
    if (
        n_acc >= 2
        and candidate_labels is not None
        and train_labels is not None
        and eval_labels is not None
        and downstream_epochs > 0
    ):
        pos, neg, info = downstream_scores(
            candidates[acc_idx],
            np.asarray(candidate_labels)[acc_idx],
            (train, train_labels),
            (holdout_eval, eval_labels),
            make_model=make_classifier,
            augment=augment,
            epochs=downstream_epochs,
            seed=seed,
            device=device,
        )
        attacks["downstream_loss"] = {**info, **_auc_block(pos, neg, train_ids, eval_ids, n_boot=n_boot, seed=seed)}
    # LOGAN attacks the GAN, not the released set: reported, not gated (D is never released, and
    # k-same, the walk and the filter stand between G and what is published)
    if discriminator is not None and S >= 3:
        ctx = candidates[:3]
        pos, neg = (
            discriminator_scores(discriminator, train, ctx, device=device),
            discriminator_scores(discriminator, holdout_eval, ctx, device=device),
        )
        attacks["discriminator"] = {
            "gated": False,
            **_auc_block(pos, neg, train_ids, eval_ids, n_boot=n_boot, seed=seed),
        }
    gated_blocks = {f"black_box/{k}": f["membership"] for k, f in figs_acc.items()}
    gated_blocks.update({k: a for k, a in attacks.items() if k != "discriminator"})
    gated = [b["auc"] for b in gated_blocks.values()]
    # Two-sided: an AUC well below 0.5 leaks membership too, to an attacker who knows the
    # synthesis keeps away from train records and flips the score. Not in phi_id's space: the
    # walk pushes images away from train identities as phi_id sees them, phi_id never leaves the
    # site, and an outsider's view of that push is what the attacker's space measures.
    outsider = {k: b for k, b in gated_blocks.items() if k != "black_box/phi_id"}

    def far_end(b: dict) -> float:  # the end of the AUC's interval farther from 0.5
        ci = b.get("auc_ci") or [None, None]
        return float("nan") if None in ci or np.isnan(b["auc"]) else max(ci[1] - 0.5, 0.5 - ci[0])

    lp = figs_acc.get("lpips", {}).get("nearest_record", {})
    reid = {
        "phi_id": _reid_block(ev.id_score[accepted], ev.id_eval, eval_ids, n_boot=n_boot, seed=seed),
        "attacker": _reid_block(ev.att_score[accepted], ev.att_eval, eval_ids, n_boot=n_boot, seed=seed),
    }
    degenerate = sorted(k for k, b in gated_blocks.items() if b.get("degenerate"))
    paths = None if paths is None else np.asarray(paths)
    report = {
        "passed": False,
        "checks": [],
        "mia_auc": _max_or_nan(gated),
        "mia_auc_upper": _max_or_nan([_upper(b.get("auc_ci"), b["auc"]) for b in gated_blocks.values()]),
        "mia_auc_attack": None,
        "mia_auc_two_sided": _max_or_nan([0.5 + abs(b["auc"] - 0.5) for b in outsider.values()]),
        "mia_auc_two_sided_upper": _max_or_nan([0.5 + far_end(b) for b in outsider.values()]),
        "tpr_at_low_fpr": _worst(figs_acc, "membership", "tpr_at_1pct_fpr"),
        "tpr_at_low_fpr_upper": _max_or_nan(
            [
                _upper(f["membership"].get("tpr_at_1pct_fpr_ci"), f["membership"]["tpr_at_1pct_fpr"])
                for f in figs_acc.values()
            ]
        ),
        "reid_rate": reid["attacker"]["rate"],
        "reid_rate_ci": reid["attacker"]["rate_ci"],
        "reid_rate_upper": _upper(reid["attacker"]["rate_ci"], reid["attacker"]["rate"]),
        # gated in the spaces an outsider could use, for the reason the two-sided AUC is: phi_id's
        # space is the one the walk optimised in, and it never leaves the site
        "closer_to_train": _worst(
            {k: f for k, f in figs_acc.items() if k != "phi_id"}, "nearest_record", "closer_to_train"
        ),
        "closer_to_train_upper": _max_or_nan(
            [
                _upper(f["nearest_record"].get("closer_to_train_ci"), f["nearest_record"]["closer_to_train"])
                for k, f in figs_acc.items()
                if k != "phi_id"
            ]
        ),
        "n_degenerate": len(degenerate),
        "degenerate": degenerate,
        ev.closeness_key: float(ev.closeness[accepted].min()) if n_acc else float("nan"),
        "mmL": lp.get("mean_min_train"),  # None without the LPIPS space (no backbone weights, or embeddings)
        "min_lpips_to_train": lp.get("min_train"),
        **{k: v for k, v in extra.items() if k != "attack_space"},
        "dp_epsilon": dp_epsilon,
        "n_candidates": S,
        "n_distinct": int(ev.distinct.sum()),
        "n_accepted": n_acc,
        "n_paths": None if paths is None else int(len(np.unique(paths[accepted]))),
        "dropped": {
            "duplicate": int((~ev.distinct).sum()),
            # counts among distinct candidates; one candidate may be dropped for several reasons
            "too_close": int((ev.too_close & ev.distinct).sum()),
            "copy": {k: int((f & ev.distinct).sum()) for k, f in ev.copies.items()},
            "reidentified": int((reid_id & ev.distinct).sum()),
            "reidentified_attacker": int((reid_att & ev.distinct).sum()),
            "either": int((~accepted).sum()),
        },
        "calibration": {
            **ev.calibration,
            "reid_threshold_phi_id": thr_id,
            "reid_threshold_attacker": thr_att,
            "reid_quantile_attacker": 1 - policy.copy_fpr,
        },
        "policy": policy.model_dump(mode="json"),
        "nearest_record": {k: v["nearest_record"] for k, v in figs_acc.items()},
        "membership": {k: v["membership"] for k, v in figs_acc.items()},
        "attacks": attacks,
        "reid": reid,
        "candidates": {
            "nearest_record": {k: v["nearest_record"] for k, v in figs_all.items()},
            "membership": {
                k: {m: v["membership"].get(m) for m in ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr")}
                for k, v in figs_all.items()
            },
            "reid_rate_phi_id": reid_rate(ev.id_score[ev.distinct], thr_id),
            "reid_rate_attacker": reid_rate(ev.att_score[ev.distinct], reid_threshold(ev.att_eval)),
            ev.closeness_key: float(ev.closeness[ev.distinct].min()) if S else None,
        },
        "bootstrap": {
            "resamples": n_boot,
            "level": 0.95,
            "unit": "patient for T and H, record for S",
            "gated_at": "the unfavourable end of each interval (*_upper)",
        },
        "n_train": len(train),
        "n_holdout_evaluation": len(holdout_eval),
    }
    if gated and not any(np.isnan(gated)):
        report["mia_auc_attack"] = list(gated_blocks)[int(np.argmax(gated))]
    report["passed"], report["checks"] = gate(report, policy)
    if details is not None:
        details["accepted"] = accepted
    return report, accepted


def _ids(train_ids, holdout_ids, n_train: int, n_holdout: int) -> tuple[np.ndarray, np.ndarray]:
    """Patient ids, or one patient per record where none are given."""
    return (
        np.arange(n_train).astype(str) if train_ids is None else np.asarray(train_ids),
        np.array([f"h{i}" for i in range(n_holdout)]) if holdout_ids is None else np.asarray(holdout_ids),
    )


def _halves_info(holdout_ids: np.ndarray, cal: np.ndarray, evl: np.ndarray) -> dict:
    return {
        "n_calibration": int(len(cal)),
        "n_evaluation": int(len(evl)),
        "patients_calibration": int(len(np.unique(holdout_ids[cal]))),
        "patients_evaluation": int(len(np.unique(holdout_ids[evl]))),
    }


def _features_fn(model, device, *, batch_size: int = 1024):
    """An Embedder (node.audit.copies) from a network's `features`: float [B,1,H,W] -> [B,F], both on `device`."""
    model.to(device).eval()

    @torch.no_grad()
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [model.features(x[i : i + batch_size].to(device)).float() for i in range(0, len(x), batch_size)]
        )

    return f


def _lpips_embedder(model):
    """An Embedder giving LPIPS features (node.audit.lpips_matrix): grey [-1,1] images upsampled as
    `prepare` does, computed on the model's device and returned on the input's."""
    import torch.nn.functional as F

    from node.audit.lpips_matrix import MIN_SIDE

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
    train_ids, holdout_ids = _ids(train_ids, holdout_ids, len(train), len(holdout))
    cal, evl = holdout_halves(holdout_ids, seed=HALVES_SEED)

    # the copy detector: each space's threshold from the calibration half's own copy distances
    log.info(
        "audit: copy detector, %d calibration and %d candidate images against %d train images", len(cal), S, len(train)
    )
    embedders = {"attacker": _features_fn(attacker, device)}
    if attacker_wide is not None:
        embedders["attacker_wide"] = _features_fn(attacker_wide, device)
    if lpips_model is not None:
        embedders["lpips"] = _lpips_embedder(lpips_model)
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
        **_halves_info(holdout_ids, cal, evl),
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
    spaces = {"pixel": _space_fn((pix_s, pix_t, pix_e), scale=pix_s.shape[1])}
    spaces.update({k: _space_fn(v) for k, v in emb.items()})
    if lpips_model is not None:
        spaces["lpips"] = _lpips_fn(lpips_model, (candidates, train, h_eval))
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
        id_score=_top_prob(phi_id, candidates, device),
        id_cal=_top_prob(phi_id, h_cal, device),
        id_eval=_top_prob(phi_id, h_eval, device),
        att_score=_top_prob(attacker, candidates, device),
        att_cal=_top_prob(attacker, h_cal, device),
        att_eval=_top_prob(attacker, h_eval, device),
    )
    report, accepted = _judge(
        ev,
        candidates=candidates,
        train=train,
        holdout_eval=h_eval,
        policy=policy,
        train_ids=train_ids,
        eval_ids=holdout_ids[evl],
        candidate_labels=candidate_labels,
        train_labels=train_labels,
        eval_labels=None if holdout_labels is None else np.asarray(holdout_labels)[evl],
        paths=paths,
        make_classifier=lambda n, _: SmallCNN(n, width=8, image_size=candidates.shape[-1]),
        augment="light",
        discriminator=discriminator,
        dp_epsilon=dp_epsilon,
        device=device,
        seed=seed,
        n_boot=n_boot,
        downstream_epochs=downstream_epochs,
        details=details,
        extra={
            "route": "plan",
            "lpips": {
                "available": lpips_model is not None,
                **(
                    {"reason": lpips_reason}
                    if lpips_model is None
                    else {"net": getattr(lpips_model, "pnet_type", None)}
                ),
            },
        },
    )
    return report, accepted


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
    train_ids, holdout_ids = _ids(train_ids, holdout_ids, len(train), len(holdout))
    cal, evl = holdout_halves(holdout_ids, seed=HALVES_SEED)
    t, s, hc, he = standardise(
        train, candidates if S else np.zeros((0, train.shape[1]), np.float32), holdout[cal], holdout[evl]
    )
    # Euclidean, not squared, so the ratio reads as "this far, relative to a real non-member"
    d_s = min_sq_dist(s, t)[0].sqrt().numpy() if S else np.zeros(0)
    typical = float(min_sq_dist(hc, t)[0].sqrt().median())
    ratio = d_s / max(typical, 1e-12)
    ev = Evidence(
        spaces={"embedding": _space_fn((s, t, he))},
        attack_features=(s.numpy(), t.numpy(), hc.numpy(), he.numpy()),
        closeness=ratio,
        closeness_key="min_embedding_distance_ratio",
        too_close=ratio < policy.min_embedding_distance_ratio,
        copies={},
        calibration={**_halves_info(holdout_ids, cal, evl), "median_holdout_distance": typical},
        distinct=distinct(np.asarray(candidates), near_mse=None),
        id_score=_top_prob(phi_id, candidates, device),
        id_cal=_top_prob(phi_id, holdout[cal], device),
        id_eval=_top_prob(phi_id, holdout[evl], device),
        att_score=_top_prob(attacker, candidates, device),
        att_cal=_top_prob(attacker, holdout[cal], device),
        att_eval=_top_prob(attacker, holdout[evl], device),
    )
    d = train.shape[1]
    report, accepted = _judge(
        ev,
        candidates=candidates,
        train=train,
        holdout_eval=holdout[evl],
        policy=policy,
        train_ids=train_ids,
        eval_ids=holdout_ids[evl],
        candidate_labels=candidate_labels,
        train_labels=train_labels,
        eval_labels=None if holdout_labels is None else np.asarray(holdout_labels)[evl],
        paths=None,
        make_classifier=lambda n, s_data: EmbeddingHead(d, n).fit_scaler(torch.from_numpy(s_data)),
        augment="none",
        discriminator=None,
        dp_epsilon=dp_epsilon,
        device=device,
        seed=seed,
        n_boot=n_boot,
        downstream_epochs=downstream_epochs,
        details=details,
        extra={"route": "cvae", "attack_space": "embedding", "median_holdout_distance": typical},
    )
    return report, accepted


def nan_to_none(x):
    """x with every float nan in its dicts and lists replaced by None (JSON has no nan)."""
    if isinstance(x, float) and np.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [nan_to_none(v) for v in x]
    return x


def _load_lpips(ws: Workspace):
    """(LPIPS model, None) with the AlexNet backbone from the model store, or (None, reason)."""
    from common.modelstore import ModelStoreError, default_store_dir
    from node.audit.lpips_matrix import build_lpips

    try:
        return build_lpips("alex", store_dir=default_store_dir(ws.root)), None
    except ModelStoreError as e:
        return None, str(e)


def audit(ws: Workspace, *, policy: PolicyConfig | None = None, note: str | None = None) -> dict:
    """Audit synth/<latest run>/candidates.npz (images, or embeddings on the CVAE route); write
    audit.json and accepted.npz beside it, and the site-only HTML report
    reports/audit-<run>.html (it shows real images).

    `policy` defaults to the site's; pass the site's policy tightened by the federation floor
    (PolicyConfig.stricter) to audit for release into a federation. Every audit is an attempt
    on the site's training data (node.site.attempts): past policy.max_attempts failed ones, it needs a
    new synth.seed and a `note`, or it raises AttemptRefused before auditing anything."""
    from node.audit.report import write_report
    from node.site.attempts import next_attempt, record_attempt

    cfg = ws.config()
    policy = policy or cfg.policy
    attempt = next_attempt(ws, seed=cfg.synth.seed, max_attempts=policy.max_attempts, note=note)
    device = pick_device(cfg.device)
    run_id = ws.latest_run()
    run_dir = ws.synth / run_id
    with np.load(run_dir / "candidates.npz", allow_pickle=False) as z:
        cand = {k: z[k] for k in z.files}
    synth_info = json.loads((run_dir / "synth.json").read_text()) if (run_dir / "synth.json").exists() else {}
    train, holdout = load_split(ws, "train"), load_split(ws, "holdout")
    details: dict = {}
    common = dict(
        policy=policy,
        device=device,
        seed=cfg.synth.seed,
        train_ids=train.patient_ids,
        holdout_ids=holdout.patient_ids,
        candidate_labels=cand["labels"],
        dp_epsilon=synth_info.get("dp_epsilon"),
        details=details,
    )
    if "embeddings" in cand:
        from node.cvae.embeddings import split_embeddings
        from node.cvae.stages import load_reid

        (t_emb, t_y), (h_emb, h_y) = (
            split_embeddings(ws, cfg.synth.extractor, s, device=device) for s in ("train", "holdout")
        )
        report, accepted = audit_embeddings(
            cand["embeddings"],
            t_emb,
            h_emb,
            phi_id=load_reid(ws, "phi_id", device),
            attacker=load_reid(ws, "phi_attack", device),
            train_labels=t_y,
            holdout_labels=h_y,
            **common,
        )
        shown = None  # nothing to show as pictures: the report has the figures and histograms
    else:
        lpips_model, lpips_reason = _load_lpips(ws)
        if lpips_model is not None:
            lpips_model.to(device)
        D = load_model(ws, "D", device) if (ws.models / "D.safetensors").exists() else None
        report, accepted = audit_images(
            cand["images"],
            train.images,
            holdout.images,
            phi_id=load_model(ws, "phi_id", device),
            attacker=load_model(ws, "phi_attack", device),
            attacker_wide=load_model(ws, "phi_attack_wide", device),
            train_labels=train.labels,
            holdout_labels=holdout.labels,
            paths=cand.get("path"),
            discriminator=D,
            lpips_model=lpips_model,
            lpips_reason=lpips_reason,
            **common,
        )
        shown = (cand["images"], train.images)
    # the synthesis's differential-privacy claim and its caveats (CVAE route) go into the signed audit
    report = nan_to_none({"run_id": run_id, "attempt": attempt, **report, "dp": synth_info.get("dp")})
    buf = io.BytesIO()
    np.savez(buf, **{k: v[accepted] for k, v in cand.items()})
    atomic_write_bytes(run_dir / "accepted.npz", buf.getvalue())
    atomic_write_json(run_dir / "audit.json", report)
    write_report(ws.reports / f"audit-{run_id}.html", report, details, images=shown)
    record_attempt(ws, attempt, run_id=run_id, passed=bool(report["passed"]))
    return report
