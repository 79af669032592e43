"""The release policy a site's audit gate and the coordinator apply (common.policy evaluates it)."""

from __future__ import annotations

from pydantic import Field

from common.config.base import _Strict


class PolicyConfig(_Strict):
    """Release gate. Per-sample filters first, then set-level checks; all must pass to publish."""

    # per sample: mean squared error on [0,1] pixels to the nearest train image. On the phantom
    # no real non-member image comes closer than 0.005 to a train image; a copy with sensor
    # noise is at ~1e-4.
    min_pixel_distance: float = Field(0.003, ge=0)
    # Per sample, the copy detector (node.audit.copies): in each of its spaces a candidate is dropped
    # when its distance to the nearest train image, minimised over shifts, flips, rotations and
    # zooms, is below the point that this share of real non-members (the holdout's calibration
    # half) fall below; the independent attacker's re-identification drop uses 1 - copy_fpr.
    # 0.02 a space, with four or five spaces, keeps about 90% of candidates that look like
    # fresh patients: a release budget fixed before any copy was planted, not fitted to them.
    # 0 turns the detector off (experiments only: a federation floor above 0 overrides it).
    copy_fpr: float = Field(0.02, ge=0, lt=0.5)
    # Every set-level estimate below is judged at the unfavourable end of its 95% bootstrap
    # interval (patients resampled), measured on the holdout's evaluation half. The defaults are
    # what sets of real images no model saw pass on pneumoniamnist and breastmnist at 800 images a
    # site (~100 evaluation images; BENCHMARKS.md, "Release gate"): there, the worst of five
    # attacks' upper bounds reaches 0.58-0.63 for such a set, so 0.6 would refuse genuine
    # non-members. A site with a larger holdout narrows the intervals and can afford 0.6.
    # Black-box membership attack on the accepted set, worst attack and space; also bounds the
    # two-sided figure (0.5 + the largest |AUC - 0.5| an outsider could use).
    max_mia_auc: float = Field(0.65, ge=0, le=1)
    # The same sets' attacker re-identification rate: 0.05 expected, upper bounds up to 0.12.
    max_reid_rate: float = Field(
        0.15,
        ge=0,
        le=1,
        description=(
            "share of accepted samples the independent attacker re-identifies (above the 95th percentile of its "
            "scores on real non-members, so 0.05 is what a set unrelated to the train patients scores)"
        ),
    )
    max_closer_to_train: float = Field(
        0.75,
        ge=0,
        le=1,
        description=("share of samples nearer train than holdout, in the spaces an outsider could use (not phi_id's)"),
    )
    min_accepted: int = Field(20, ge=1, description="publish nothing smaller (distinct images)")
    # Black-box attack's true-positive rate at 1% false positives, worst space: the share of
    # members an attacker singles out almost without error.
    max_tpr_at_low_fpr: float = Field(0.2, ge=0, le=1)
    # Mean LPIPS of the accepted set to its nearest train image (mmL); 0 turns it off. A value
    # above 0 needs the LPIPS backbone in the model store, else the check fails as not evaluated.
    min_mmL: float = Field(0.0, ge=0)
    # Differential privacy budget, checked only where the synthesis declares an epsilon (the
    # PLAN route declares none); None: no limit.
    max_dp_epsilon: float | None = Field(None, gt=0)
    # CVAE route, per sample, in place of min_pixel_distance: the distance of a synthetic embedding
    # to its nearest train record, relative to the median of the same distance for real holdout
    # records (non-members), in the train-standardised embedding space.
    min_embedding_distance_ratio: float = Field(0.5, ge=0)
    # Failed audits on the same training data before another needs a new synth.seed and a note
    # (node.site.attempts): a gate retried until it passes is no gate.
    max_attempts: int = Field(3, ge=1)

    def stricter(self, floor: "PolicyConfig") -> "PolicyConfig":
        """This policy tightened so that it is at least as strict as `floor` (the federation's):
        per field, the stricter value by POLICY_BOUNDS' direction (None, no limit, never wins)."""
        values = {}
        for name, (kind, _) in POLICY_BOUNDS.items():
            limits = [v for v in (getattr(self, name), getattr(floor, name)) if v is not None]
            values[name] = (min if kind == "max" else max)(limits, default=None)
        return PolicyConfig(**values)


# Every PolicyConfig field once: "max" (a lower value is stricter) or "min" (a higher one is), and
# the audit figures it bounds (common/policy.evaluate). copy_fpr and max_attempts bound how the
# audit runs, not a figure it reports.
POLICY_BOUNDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "max_mia_auc": ("max", ("mia_auc_upper", "mia_auc_two_sided_upper")),
    "max_tpr_at_low_fpr": ("max", ("tpr_at_low_fpr_upper",)),
    "max_reid_rate": ("max", ("reid_rate_upper",)),
    "max_closer_to_train": ("max", ("closer_to_train_upper",)),
    "min_accepted": ("min", ("n_accepted",)),
    "min_pixel_distance": ("min", ("min_pixel_mse_to_train",)),  # images only
    "min_embedding_distance_ratio": ("min", ("min_embedding_distance_ratio",)),  # embeddings only
    "min_mmL": ("min", ("mmL",)),  # when above 0
    "max_dp_epsilon": ("max", ("dp_epsilon",)),  # when set and the synthesis declares an epsilon
    "copy_fpr": ("min", ()),
    "max_attempts": ("max", ()),
}
