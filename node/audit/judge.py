"""Judging a candidate set, the part of the audit both routes share (docs/DESIGN.md 3.5): the
per-sample filter, the set-level attacks on what it accepts, the report and the gate.

A route measures its `Evidence` (node.audit.images, node.audit.embeddings); `judge` turns it into
the report written to audit.json and the mask of accepted candidates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from common.config import PolicyConfig
from common.fileio import nan_to_none
from common.policy import evaluate
from node.audit.attacks import density_ratio_scores, discriminator_scores, downstream_scores
from node.audit.figures import (
    auc_block,
    balanced_sample,
    max_or_nan,
    memo_rows,
    reid_block,
    reid_rate,
    reid_threshold,
    set_figures,
    upper,
    worst,
)
from node.federation.task import predict_logits

# The holdout's halves do not move with synth.seed: retrying with new seeds cannot shop for a lucky split.
HALVES_SEED = 0

log = logging.getLogger(__name__)


@dataclass
class Records:
    """The records a candidate set is judged against. Data are images uint8 [*,H,W] or
    embeddings float [*,D]; the holdout here is its evaluation half only."""

    candidates: np.ndarray  # [S,...]
    train: np.ndarray  # [N,...]
    holdout_eval: np.ndarray  # [B,...]
    train_ids: np.ndarray  # [N] patient ids
    eval_ids: np.ndarray  # [B]
    candidate_labels: np.ndarray | None = None  # [S]; with the next two, the downstream-model attack runs
    train_labels: np.ndarray | None = None  # [N]
    eval_labels: np.ndarray | None = None  # [B]
    paths: np.ndarray | None = None  # [S] each candidate's path (PLAN route): the report counts those released


@dataclass
class Evidence:
    """What a route's audit measured before judging the set. Holdout arrays are split into the
    calibration half (`*_cal`: thresholds) and the evaluation half (`*_eval`: set-level figures)."""

    spaces: dict  # name -> nearest-neighbour function over (S, T, H_eval) (node.audit.figures.space_fn)
    # S, T, H_cal, H_eval in the space DOMIAS attacks
    attack_features: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
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


def top_prob(model, records: np.ndarray, device) -> np.ndarray:
    """A classifier's top-class probability [N] for records [N,...]: the re-identification score."""
    if len(records) == 0:
        return np.zeros(0)
    return torch.softmax(predict_logits(model, records, device=device), 1).max(1).values.numpy()


def patient_ids(train_ids, holdout_ids, n_train: int, n_holdout: int) -> tuple[np.ndarray, np.ndarray]:
    """Patient ids, or one patient per record where none are given."""
    return (
        np.arange(n_train).astype(str) if train_ids is None else np.asarray(train_ids),
        np.array([f"h{i}" for i in range(n_holdout)]) if holdout_ids is None else np.asarray(holdout_ids),
    )


def halves_info(holdout_ids: np.ndarray, cal: np.ndarray, evl: np.ndarray) -> dict:
    """Sizes of the holdout's calibration and evaluation halves, in records and patients."""
    return {
        "n_calibration": int(len(cal)),
        "n_evaluation": int(len(evl)),
        "patients_calibration": int(len(np.unique(holdout_ids[cal]))),
        "patients_evaluation": int(len(np.unique(holdout_ids[evl]))),
    }


@dataclass
class AttackSettings:
    """How the set-level attacks beyond the nearest neighbour run."""

    make_classifier: Callable  # (n_classes, training data) -> model, for the downstream-model attack
    augment: str  # node.federation.task.train_classifier's augmentation for that model
    device: torch.device | str
    seed: int = 0
    n_boot: int = 200  # bootstrap resamples per interval
    downstream_epochs: int = 20  # 0: no downstream-model attack
    discriminator: torch.nn.Module | None = None  # the GAN's D: LOGAN, reported, not gated
    attack_space: str = "attacker"  # the space of attack_features, for the report


@dataclass
class Filtered:
    """The per-sample filter's verdicts, bool [S] each, and the re-identification thresholds."""

    accepted: np.ndarray
    reid_id: np.ndarray
    reid_att: np.ndarray
    threshold_id: float
    threshold_att: float


def per_sample_filter(ev: Evidence, policy: PolicyConfig) -> Filtered:
    """Keep a candidate when it is distinct, not too close, no edited copy in any space and
    re-identified by neither phi_id (above the calibration half's 95th percentile) nor the
    attacker (above its 1 - copy_fpr point)."""
    thr_id = reid_threshold(ev.id_cal)
    thr_att = reid_threshold(ev.att_cal, quantile=1 - policy.copy_fpr)
    reid_id, reid_att = ev.id_score > thr_id, ev.att_score > thr_att
    copy_any = np.zeros(len(ev.distinct), dtype=bool)
    for flags in ev.copies.values():
        copy_any |= flags
    accepted = ev.distinct & ~ev.too_close & ~copy_any & ~reid_id & ~reid_att
    return Filtered(accepted, reid_id, reid_att, thr_id, thr_att)


def set_attacks(ev: Evidence, r: Records, acc_idx: np.ndarray, a: AttackSettings) -> dict:
    """The attacks on the accepted records `acc_idx` beyond the nearest neighbour: DOMIAS's
    density ratio, a downstream model's loss, and LOGAN on the GAN (reported, not gated)."""
    log.info("audit: attacks on the %d accepted records (%d bootstrap resamples)", len(acc_idx), a.n_boot)
    ids = (r.train_ids, r.eval_ids)
    attacks: dict = {}
    if len(acc_idx) >= 2:
        s_e, t_e, hc_e, he_e = ev.attack_features
        pos, neg = density_ratio_scores(s_e[acc_idx], t_e, he_e, reference=hc_e)
        attacks["density_ratio"] = {"space": a.attack_space, **auc_block(pos, neg, *ids, n_boot=a.n_boot, seed=a.seed)}
    labelled = r.candidate_labels is not None and r.train_labels is not None and r.eval_labels is not None
    if len(acc_idx) >= 2 and labelled and a.downstream_epochs > 0:
        pos, neg, info = downstream_scores(
            r.candidates[acc_idx],
            np.asarray(r.candidate_labels)[acc_idx],
            (r.train, r.train_labels),
            (r.holdout_eval, r.eval_labels),
            make_model=a.make_classifier,
            augment=a.augment,
            epochs=a.downstream_epochs,
            seed=a.seed,
            device=a.device,
        )
        attacks["downstream_loss"] = {**info, **auc_block(pos, neg, *ids, n_boot=a.n_boot, seed=a.seed)}
    # LOGAN attacks the GAN, not the released set: reported, not gated (D is never released, and
    # k-same, the walk and the filter stand between G and what is published)
    if a.discriminator is not None and len(r.candidates) >= 3:
        ctx = r.candidates[:3]
        pos = discriminator_scores(a.discriminator, r.train, ctx, device=a.device)
        neg = discriminator_scores(a.discriminator, r.holdout_eval, ctx, device=a.device)
        attacks["discriminator"] = {"gated": False, **auc_block(pos, neg, *ids, n_boot=a.n_boot, seed=a.seed)}
    return attacks


def _far_end(b: dict) -> float:
    """The end of an AUC's interval farther from 0.5."""
    ci = b.get("auc_ci") or [None, None]
    return float("nan") if None in ci or np.isnan(b["auc"]) else max(ci[1] - 0.5, 0.5 - ci[0])


def membership_summary(figs_acc: dict, attacks: dict) -> dict:
    """The gated membership figures: the worst AUC over every gated attack, its upper bound, the
    two-sided AUC in the spaces an outsider could use, and the worst TPR at 1% FPR."""
    gated_blocks = {f"black_box/{k}": f["membership"] for k, f in figs_acc.items()}
    gated_blocks.update({k: a for k, a in attacks.items() if k != "discriminator"})
    gated = [b["auc"] for b in gated_blocks.values()]
    # Two-sided: an AUC well below 0.5 leaks membership too, to an attacker who knows the
    # synthesis keeps away from train records and flips the score. Not in phi_id's space: the
    # walk pushes images away from train identities as phi_id sees them, phi_id never leaves the
    # site, and an outsider's view of that push is what the attacker's space measures.
    outsider = [b for k, b in gated_blocks.items() if k != "black_box/phi_id"]
    degenerate = sorted(k for k, b in gated_blocks.items() if b.get("degenerate"))
    worst_attack = None
    if gated and not any(np.isnan(gated)):
        worst_attack = list(gated_blocks)[int(np.argmax(gated))]
    tpr = [
        upper(f["membership"].get("tpr_at_1pct_fpr_ci"), f["membership"]["tpr_at_1pct_fpr"]) for f in figs_acc.values()
    ]
    return {
        "mia_auc": max_or_nan(gated),
        "mia_auc_upper": max_or_nan([upper(b.get("auc_ci"), b["auc"]) for b in gated_blocks.values()]),
        "mia_auc_attack": worst_attack,
        "mia_auc_two_sided": max_or_nan([0.5 + abs(b["auc"] - 0.5) for b in outsider]),
        "mia_auc_two_sided_upper": max_or_nan([0.5 + _far_end(b) for b in outsider]),
        "tpr_at_low_fpr": worst(figs_acc, "membership", "tpr_at_1pct_fpr"),
        "tpr_at_low_fpr_upper": max_or_nan(tpr),
        "n_degenerate": len(degenerate),
        "degenerate": degenerate,
    }


def closeness_summary(figs_acc: dict) -> dict:
    """The closer-to-train share, gated in the spaces an outsider could use, for the reason the
    two-sided AUC is: phi_id's space is the one the walk optimised in, and it never leaves the site."""
    outsider = {k: f for k, f in figs_acc.items() if k != "phi_id"}
    nr = [f["nearest_record"] for f in outsider.values()]
    lp = figs_acc.get("lpips", {}).get("nearest_record", {})
    return {
        "closer_to_train": worst(outsider, "nearest_record", "closer_to_train"),
        "closer_to_train_upper": max_or_nan([upper(n.get("closer_to_train_ci"), n["closer_to_train"]) for n in nr]),
        "mmL": lp.get("mean_min_train"),  # None without the LPIPS space (no backbone weights, or embeddings)
        "min_lpips_to_train": lp.get("min_train"),
    }


def gate(report: dict, policy: PolicyConfig) -> tuple[bool, list[dict]]:
    """The set-level checks of the policy on the report's top-level figures (common.policy:
    the same function the coordinator applies to a received bundle); nan or missing figures fail."""
    checks = evaluate(nan_to_none(report), policy)
    return all(c["passed"] for c in checks), checks


def judge(
    ev: Evidence,
    r: Records,
    policy: PolicyConfig,
    a: AttackSettings,
    *,
    dp_epsilon: float | None = None,
    extra: dict | None = None,
    details: dict | None = None,
) -> tuple[dict, np.ndarray]:
    """The per-sample filter, every set-level figure on the accepted set and the gate. `extra`
    goes into the report as it is; `details`, when a dict, gets distances and closest pairs for
    the HTML report. Returns (report, accepted mask bool [S])."""
    S = len(r.candidates)
    f = per_sample_filter(ev, policy)
    acc_idx, all_idx = np.flatnonzero(f.accepted), np.flatnonzero(ev.distinct)
    kw = {
        "n_t": len(r.train),
        "n_h": len(r.holdout_eval),
        "train_ids": r.train_ids,
        "holdout_ids": r.eval_ids,
        "n_boot": a.n_boot,
        "seed": a.seed,
    }
    t_bal = balanced_sample(r.train_ids, r.eval_ids, seed=a.seed)
    spaces = {name: memo_rows(nn) for name, nn in ev.spaces.items()}  # the accepted rows are searched once
    figs_acc = set_figures(spaces, t_bal, acc_idx, details=details, **kw)
    figs_all = set_figures(spaces, t_bal, all_idx, **{**kw, "n_boot": 0}) if S else figs_acc
    attacks = set_attacks(ev, r, acc_idx, a)
    reid = {
        "phi_id": reid_block(ev.id_score[f.accepted], ev.id_eval, r.eval_ids, n_boot=a.n_boot, seed=a.seed),
        "attacker": reid_block(ev.att_score[f.accepted], ev.att_eval, r.eval_ids, n_boot=a.n_boot, seed=a.seed),
    }
    n_acc = len(acc_idx)
    paths = None if r.paths is None else np.asarray(r.paths)
    report = {
        "passed": False,
        "checks": [],
        **membership_summary(figs_acc, attacks),
        "reid_rate": reid["attacker"]["rate"],
        "reid_rate_ci": reid["attacker"]["rate_ci"],
        "reid_rate_upper": upper(reid["attacker"]["rate_ci"], reid["attacker"]["rate"]),
        **closeness_summary(figs_acc),
        ev.closeness_key: float(ev.closeness[f.accepted].min()) if n_acc else float("nan"),
        **(extra or {}),
        "dp_epsilon": dp_epsilon,
        "n_candidates": S,
        "n_distinct": int(ev.distinct.sum()),
        "n_accepted": n_acc,
        "n_paths": None if paths is None else int(len(np.unique(paths[f.accepted]))),
        "dropped": {
            "duplicate": int((~ev.distinct).sum()),
            # counts among distinct candidates; one candidate may be dropped for several reasons
            "too_close": int((ev.too_close & ev.distinct).sum()),
            "copy": {k: int((c & ev.distinct).sum()) for k, c in ev.copies.items()},
            "reidentified": int((f.reid_id & ev.distinct).sum()),
            "reidentified_attacker": int((f.reid_att & ev.distinct).sum()),
            "either": int((~f.accepted).sum()),
        },
        "calibration": {
            **ev.calibration,
            "reid_threshold_phi_id": f.threshold_id,
            "reid_threshold_attacker": f.threshold_att,
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
            "reid_rate_phi_id": reid_rate(ev.id_score[ev.distinct], f.threshold_id),
            "reid_rate_attacker": reid_rate(ev.att_score[ev.distinct], reid_threshold(ev.att_eval)),
            ev.closeness_key: float(ev.closeness[ev.distinct].min()) if S else None,
        },
        "bootstrap": {
            "resamples": a.n_boot,
            "level": 0.95,
            "unit": "patient for T and H, record for S",
            "gated_at": "the unfavourable end of each interval (*_upper)",
        },
        "n_train": len(r.train),
        "n_holdout_evaluation": len(r.holdout_eval),
    }
    report["passed"], report["checks"] = gate(report, policy)
    if details is not None:
        details["accepted"] = f.accepted
    return report, f.accepted
