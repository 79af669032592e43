"""Stage `audit`: membership-inference and re-identification attacks on the latest synthetic
run, the per-sample filter and the release gate (docs/DESIGN.md 3.5). It loads, calls
node.audit.images or node.audit.embeddings, and saves audit.json, accepted.npz and the site-only
HTML report.

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

import numpy as np

from common.config import PolicyConfig
from common.fileio import atomic_write_bytes, atomic_write_json, nan_to_none
from node.audit.embeddings import audit_embeddings
from node.audit.images import audit_images
from node.plan.train import load_model
from node.site.device import pick_device
from node.site.ingest import load_split
from node.site.workspace import Workspace


def _load_lpips(ws: Workspace):
    """(LPIPS model, None) with the AlexNet backbone from the model store, or (None, reason)."""
    from common.modelstore import ModelStoreError, default_store_dir
    from node.audit.lpips_matrix import build_lpips

    try:
        return build_lpips("alex", store_dir=default_store_dir(ws.root)), None
    except ModelStoreError as e:
        return None, str(e)


CONTROL_FIGURES = ("mia_auc_upper", "mia_auc_two_sided_upper", "reid_rate_upper", "closer_to_train_upper")


def control(audit_set, x: np.ndarray, labels: np.ndarray, *, n: int, seed: int) -> dict:
    """The same audit of up to `n` of the site's real test records x [N,...] (no model saw them),
    run when a candidate set fails. Real unseen records are as private as a release can be: when
    they fail too, the site's holdout is too small for the gate to tell private data from leaking;
    when they pass, the failure is the synthetic set's. `audit_set(x, labels, paths, details)` is
    the audit the candidates had. Nothing here is published or counted as an attempt."""
    pick = np.sort(np.random.default_rng(seed).permutation(len(x))[:n])
    report, accepted = audit_set(x[pick], labels[pick], None, None)
    return {
        "what": "the site's real test records (no model saw them) through the same audit",
        "n": int(len(pick)),
        "passed": bool(report["passed"]),
        "failed": [c["name"] for c in report["checks"] if not c["passed"]],
        "kept_share": float(accepted.mean()) if len(pick) else float("nan"),
        **{k: report.get(k) for k in CONTROL_FIGURES},
    }


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
        dp_epsilon=synth_info.get("dp_epsilon"),
    )
    if "embeddings" in cand:
        from node.cvae.embeddings import split_embeddings
        from node.cvae.stages import load_reid

        (t_emb, t_y), (h_emb, h_y) = (
            split_embeddings(ws, cfg.synth.extractor, s, device=device) for s in ("train", "holdout")
        )

        def unseen():
            return split_embeddings(ws, cfg.synth.extractor, "test", device=device)

        nets = dict(phi_id=load_reid(ws, "phi_id", device), attacker=load_reid(ws, "phi_attack", device))

        def audit_set(x, labels, paths, details):
            return audit_embeddings(
                x,
                t_emb,
                h_emb,
                **nets,
                train_labels=t_y,
                holdout_labels=h_y,
                candidate_labels=labels,
                details=details,
                **common,
            )

        key, shown = "embeddings", None  # nothing to show as pictures: the report has the figures and histograms
    else:
        lpips_model, lpips_reason = _load_lpips(ws)
        if lpips_model is not None:
            lpips_model.to(device)
        nets = dict(
            phi_id=load_model(ws, "phi_id", device),
            attacker=load_model(ws, "phi_attack", device),
            attacker_wide=load_model(ws, "phi_attack_wide", device),
            discriminator=load_model(ws, "D", device) if (ws.models / "D.safetensors").exists() else None,
            lpips_model=lpips_model,
            lpips_reason=lpips_reason,
        )

        def unseen():
            test = load_split(ws, "test")
            return test.images, test.labels

        def audit_set(x, labels, paths, details):
            return audit_images(
                x,
                train.images,
                holdout.images,
                **nets,
                train_labels=train.labels,
                holdout_labels=holdout.labels,
                candidate_labels=labels,
                paths=paths,
                details=details,
                **common,
            )

        key, shown = "images", (cand["images"], train.images)
    report, accepted = audit_set(cand[key], cand["labels"], cand.get("path"), details)
    if not report["passed"]:
        # the test split is read only here: a set that passes never needs it
        report["control"] = control(audit_set, *unseen(), n=len(cand[key]), seed=cfg.synth.seed)
    # the synthesis's differential-privacy claim and its caveats (CVAE route) go into the signed audit
    report = nan_to_none({"run_id": run_id, "attempt": attempt, **report, "dp": synth_info.get("dp")})
    buf = io.BytesIO()
    np.savez(buf, **{k: v[accepted] for k, v in cand.items()})
    atomic_write_bytes(run_dir / "accepted.npz", buf.getvalue())
    atomic_write_json(run_dir / "audit.json", report)
    write_report(ws.reports / f"audit-{run_id}.html", report, details, images=shown)
    record_attempt(ws, attempt, run_id=run_id, passed=bool(report["passed"]))
    return report
