"""Size profiles: `plan-node init --profile` writes the preset's values into site.yaml."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from common.config import ConfigError, SiteConfig, load_site_config, profile_site_config
from node.cli import app
from node.plan.gan import Generator


def test_cpu_profile_is_the_defaults_sized_for_two_cores():
    cfg = profile_site_config("cpu", name="a")
    assert cfg == SiteConfig(name="a")  # the cpu preset adds nothing: the defaults are the cpu sizes
    g = cfg.models.gan
    # what README and BENCHMARKS.md state for the cpu profile: a 32x32 generator, 64-d W, 600 steps
    assert (cfg.data.image_size, g.w_dim, g.channels, g.steps, cfg.synth.walk.iters, cfg.device) == (
        32,
        64,
        64,
        600,
        60,
        "auto",
    )
    assert profile_site_config("gpu", name="a") != cfg


def test_gpu_profile_overrides_sizes_and_keeps_explicit_fields():
    cfg = profile_site_config("gpu", name="b", models={"gan": {"steps": 7}})
    assert cfg.device == "cuda" and cfg.models.gan.w_dim == 256 and cfg.models.gan.channels == 256
    assert cfg.models.gan.steps == 7  # an explicit value wins over the preset
    assert cfg.models.gan.mapping_layers == 4 and cfg.models.classifier.width == 32  # the rest of the preset stays
    G = Generator(
        z_dim=cfg.models.gan.z_dim,
        w_dim=cfg.models.gan.w_dim,
        mapping_layers=cfg.models.gan.mapping_layers,
        image_size=128,
        channels=cfg.models.gan.channels,
    )
    assert G.synthesis(G.w_avg[None]).shape == (1, 1, 128, 128)


def test_unknown_profile_is_named():
    with pytest.raises(ConfigError, match="'tpu'"):
        profile_site_config("tpu")


def test_init_writes_the_profile_into_site_yaml(tmp_path):
    res = CliRunner().invoke(app, ["init", "--site-dir", str(tmp_path / "s"), "--name", "s", "--profile", "gpu"])
    assert res.exit_code == 0, res.output
    raw = yaml.safe_load((tmp_path / "s" / "site.yaml").read_text())
    assert raw["models"]["gan"]["w_dim"] == 256 and raw["device"] == "cuda"
    assert load_site_config(tmp_path / "s" / "site.yaml").synth.walk.iters == 500
