"""The release policy as a pure function of an audit result (docs/DESIGN.md 3.5).

The same function decides a site's gate (node/audit/judge.py) and the coordinator's check of a
received bundle's signed audit against the federation's floor (server/store.py): a site that
edits its own policy, or signs an audit made under a laxer one, is still refused upstream.

An audit result is the dict written to audit.json and signed into the bundle's predicate; the
figures read here are top-level keys. Estimated figures are judged at the unfavourable end of
their 95% bootstrap interval (the `_upper` keys), measured on the holdout's evaluation half:

    mia_auc_upper            worst membership-attack AUC on the released set
    mia_auc_two_sided_upper  0.5 + the largest |AUC - 0.5| in the spaces an outsider could use
                             (all but phi_id's): "members are what nothing resembles" leaks too
    tpr_at_low_fpr_upper     worst black-box TPR at 1% FPR
    reid_rate_upper          share of the set the independent attacker re-identifies
    closer_to_train_upper    share of the set nearer a train than a holdout record
    n_degenerate             attack spaces whose scores are all equal (dead features): any fails
    n_accepted               distinct samples released
    min_pixel_mse_to_train   smallest pixel MSE of a released sample to a train image (images)
    min_embedding_distance_ratio  smallest distance of a released embedding to a train record,
                             relative to a holdout record's typical one (route "cvae")
    mmL                      mean LPIPS to the nearest train image (None: LPIPS unavailable)
    dp_epsilon               declared differential-privacy epsilon (None: none declared)

A figure that a check needs but the audit lacks (or holds as null) fails that check.
"""

from __future__ import annotations

import math
from typing import Any

from common.config import POLICY_BOUNDS, PolicyConfig


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(float(x)):
        return None
    return float(x)


def _applies(field: str, audit: dict, policy: PolicyConfig) -> bool:
    """Whether a policy field bounds this audit: the per-sample minimum is in the released data's
    own space (pixels, or embeddings), mmL only when asked for, epsilon only when declared."""
    images = audit.get("route") != "cvae"
    return {
        "min_pixel_distance": images,
        "min_embedding_distance_ratio": not images,
        "min_mmL": policy.min_mmL > 0,
        "max_dp_epsilon": policy.max_dp_epsilon is not None and audit.get("dp_epsilon") is not None,
    }.get(field, True)


def evaluate(audit: dict, policy: PolicyConfig) -> list[dict]:
    """Every applicable check: [{name, value, threshold, kind ("max"/"min"), passed, message}].

    `message` says what failed by how much ("mia_auc_upper 0.82 > max 0.65 (by 0.17)")."""
    checks = [("n_degenerate", "max", 0.0)]
    for field, (kind, figures) in POLICY_BOUNDS.items():
        if _applies(field, audit, policy):
            checks += [(figure, kind, float(getattr(policy, field))) for figure in figures]
    out = []
    for name, kind, thr in checks:
        value = _num(audit.get(name))
        if value is None:
            ok, msg = False, f"{name} not evaluated (missing from the audit) but the policy requires {kind} {thr:g}"
        else:
            ok = value <= thr if kind == "max" else value >= thr
            op = ">" if kind == "max" else "<"
            msg = "" if ok else f"{name} {value:.4g} {op} {kind} {thr:.4g} (by {abs(value - thr):.3g})"
        out.append({"name": name, "value": value, "threshold": thr, "kind": kind, "passed": bool(ok), "message": msg})
    return out


def check_audit(audit: dict, policy: PolicyConfig) -> list[str]:
    """Messages of the checks `audit` fails under `policy`; empty when it passes. An audit that
    says it did not pass fails too, whatever its figures."""
    if not isinstance(audit, dict):
        return ["audit is not an object"]
    failures = [c["message"] for c in evaluate(audit, policy) if not c["passed"]]
    # the per-sample filter's budget is not a figure of the set: read it from the policy the audit ran under
    used = _num((audit.get("policy") or {}).get("copy_fpr")) if isinstance(audit.get("policy"), dict) else None
    if used is None or used < policy.copy_fpr:
        failures.append(f"audit ran its copy detector at copy_fpr {used} below the floor's {policy.copy_fpr:g}")
    if audit.get("passed") is not True:
        failures.append(f"audit.passed is {audit.get('passed')!r}")
    return failures
