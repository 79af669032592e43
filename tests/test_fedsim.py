"""bench.fedsim's yardstick: centralised training gets the federation's total optimiser steps."""

import numpy as np

from bench.fedsim import central, federation_steps, round_epochs
from common.config import DownstreamConfig
from node.federation.task import evaluate_classifier


def test_the_federation_steps_count_every_site_every_round():
    ds = DownstreamConfig(rounds=3, local_epochs=2, min_local_steps=100, batch_size=16)
    # 200 records: 13 steps an epoch, so 8 epochs reach 100 steps; 3 sites x 3 rounds x 8 x 13
    assert federation_steps([200, 200, 200], ds) == 936
    # one site's schedule on the union (600 records: 38 steps an epoch, 3 epochs a round) is far fewer
    assert ds.rounds * round_epochs(600, ds) * 38 == 342


def test_central_learns_from_the_union_of_the_sites():
    # each site holds one class only: a model trained on either alone cannot tell them apart
    rng = np.random.default_rng(0)
    dark = (rng.integers(0, 60, (24, 28, 28)).astype(np.uint8), np.zeros(24, dtype=np.int64))
    bright = (rng.integers(190, 255, (24, 28, 28)).astype(np.uint8), np.ones(24, dtype=np.int64))
    ds = DownstreamConfig(rounds=1, local_epochs=1, min_local_steps=30, batch_size=8, width=4)
    model = central([dark, bright], n_classes=2, ds=ds, seed=0)
    x = np.concatenate([dark[0], bright[0]])
    y = np.concatenate([dark[1], bright[1]])
    assert evaluate_classifier(model, x, y, device="cpu")["accuracy"] == 1.0
