"""Downstream evaluation metrics."""

from __future__ import annotations

import numpy as np
import pytest

from common.metrics import classification_metrics, roc_auc


def test_perfect_and_inverted_scores():
    assert roc_auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert roc_auc([0.1], [0.9]) == 0.0
    assert roc_auc([0.5, 0.5], [0.5]) == 0.5  # ties count half


def test_classification_metrics_on_imbalanced_labels():
    labels = np.array([0, 0, 0, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
    m = classification_metrics(probs, labels, 2)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["recall-0"] == pytest.approx(2 / 3) and m["recall-1"] == 1.0
    assert m["balanced-accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["auroc"] == pytest.approx(1.0)  # the one positive outscores every negative


def test_absent_class_is_nan_not_zero():
    m = classification_metrics(np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]]), np.array([0, 1]), 3)
    assert np.isnan(m["recall-2"]) and m["balanced-accuracy"] == 1.0
