"""Classification and attack metrics shared by the audit and the downstream evaluation."""

from __future__ import annotations

import numpy as np


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


def classification_metrics(probs: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, float]:
    """probs [N,C] (rows sum to 1), labels int [N] -> accuracy, balanced accuracy, macro one-vs-rest
    AUROC and per-class recall (`recall-<c>`; nan for a class absent from `labels`)."""
    labels = np.asarray(labels)
    pred = probs.argmax(1)
    recalls = [
        float((pred[labels == c] == c).mean()) if (labels == c).any() else float("nan") for c in range(n_classes)
    ]
    aucs = [roc_auc(probs[labels == c, c], probs[labels != c, c]) for c in range(n_classes)]
    present = [r for r in recalls if not np.isnan(r)]
    valid_aucs = [a for a in aucs if not np.isnan(a)]
    return {
        "accuracy": float((pred == labels).mean()),
        "balanced-accuracy": float(np.mean(present)) if present else float("nan"),
        "auroc": float(np.mean(valid_aucs)) if valid_aucs else float("nan"),
        **{f"recall-{c}": r for c, r in enumerate(recalls)},
    }
