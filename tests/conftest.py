"""Shared test setup: no model-hub access, and tiny site configs for the node's ML stages."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

TINY_SITE_YAML = """\
name: tiny
device: cpu
data:
  image_size: 16
  phantom: {n_patients: 16, images_per_patient: 3, n_classes: 2, seed: 1}
models:
  gan: {z_dim: 16, w_dim: 16, channels: 32, steps: 6, batch_size: 8, checkpoint_every: 3}
  classifier: {width: 4, attacker_width: 4, epochs: 2, id_epochs: 2}
synth:
  k: 2
  target_size: 24
  invert_steps: 5
  walk: {points: 5, iters: 3}
policy: {min_accepted: 1}
"""


@pytest.fixture
def tiny_site_yaml() -> str:
    return TINY_SITE_YAML


@pytest.fixture
def tiny_workspace(tmp_path):
    """A fresh workspace with the tiny config (phantom data, a few GAN steps)."""
    from node.site.workspace import Workspace

    root = tmp_path / "site"
    root.mkdir()
    (root / "site.yaml").write_text(TINY_SITE_YAML)
    return Workspace(root)


@pytest.fixture
def key_a(tmp_path):
    """Site a's signing key pair (private key, public PEM) under tmp_path/keys."""
    from tests.helpers_exchange import site_key

    return site_key(tmp_path / "keys", "a")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """The attack matrix's live federation (tests/helpers_attack.py), one per test module."""
    from tests.helpers_attack import live_federation

    with live_federation(tmp_path_factory.mktemp("attack")) as f:
        yield f
