"""Config files: typed, strict, and errors that name the file, the field and what was expected."""

from __future__ import annotations

import pytest
import yaml

from common.config import (
    ConfigError,
    FederationConfig,
    PolicyConfig,
    SiteConfig,
    commented_yaml,
    load_federation_config,
    load_site_config,
)


def _write(tmp_path, text: str, name: str = "site.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_load_from_an_empty_file(tmp_path):
    assert load_site_config(_write(tmp_path, "")) == SiteConfig()
    assert load_federation_config(_write(tmp_path, "", "federation.yaml")) == FederationConfig()


def test_unknown_key_names_file_and_field(tmp_path):
    p = _write(tmp_path, "synth:\n  walk:\n    itres: 5\n")
    with pytest.raises(ConfigError) as e:
        load_site_config(p)
    assert str(p) in str(e.value) and "synth.walk.itres: unknown key" in str(e.value)


def test_wrong_type_names_field_value_and_expectation(tmp_path):
    p = _write(tmp_path, "synth:\n  k: three\n")
    with pytest.raises(ConfigError, match=r"synth\.k: .*valid integer.*'three'"):
        load_site_config(p)


def test_out_of_range_value(tmp_path):
    with pytest.raises(ConfigError, match=r"policy\.max_mia_auc: .*less than or equal to 1"):
        load_site_config(_write(tmp_path, "policy: {max_mia_auc: 1.5}\n"))


def test_device_names_a_gpu_by_index_and_refuses_anything_else(tmp_path):
    assert load_site_config(_write(tmp_path, "device: cuda:1\n")).device == "cuda:1"
    with pytest.raises(ConfigError, match=r"device: .*auto\|cpu\|cuda.*'gpu'"):
        load_site_config(_write(tmp_path, "device: gpu\n"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: file not found"):
        load_site_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_site_config(_write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_site_config(_write(tmp_path, "- 1\n- 2\n"))


def test_data_path_required_for_files_and_resolved_against_config_dir(tmp_path):
    with pytest.raises(ConfigError, match="data.path is required"):
        load_site_config(_write(tmp_path, "data: {source: npz}\n"))
    cfg = load_site_config(_write(tmp_path, "data: {source: npz, path: x/d.npz}\n"))
    assert cfg.data.path == (tmp_path / "x" / "d.npz").resolve()


def test_split_must_leave_a_test_split(tmp_path):
    with pytest.raises(ConfigError, match="leave a test split"):
        load_site_config(_write(tmp_path, "data: {split: {train: 0.7, holdout: 0.3}}\n"))


def test_commented_yaml_round_trips():
    cfg = SiteConfig(name="st-marys", synth={"k": 5})
    text = commented_yaml(cfg, title="test")
    assert text.startswith("# test")
    assert SiteConfig.model_validate(yaml.safe_load(text)) == cfg


def test_site_policy_tightened_by_federation_floor():
    site = PolicyConfig(max_mia_auc=0.7, max_reid_rate=0.05, min_accepted=10)
    floor = PolicyConfig(max_mia_auc=0.6, max_reid_rate=0.2, min_accepted=30)
    p = site.stricter(floor)
    assert (p.max_mia_auc, p.max_reid_rate, p.min_accepted) == (0.6, 0.05, 30)


def test_every_policy_field_has_one_direction_and_stricter_follows_it():
    """POLICY_BOUNDS is the one statement of which way each policy field tightens: it covers every
    field, and `stricter` takes, field by field, the value a stricter gate would use."""
    from common.config import POLICY_BOUNDS, PolicyConfig

    assert set(POLICY_BOUNDS) == set(PolicyConfig.model_fields)
    loose = PolicyConfig(min_pixel_distance=0.001, max_mia_auc=0.9, max_reid_rate=0.5, max_closer_to_train=0.9,
                         min_accepted=5, max_tpr_at_low_fpr=0.5, min_mmL=0.0, max_dp_epsilon=None,
                         min_embedding_distance_ratio=0.1, copy_fpr=0.01, max_attempts=9)  # fmt: skip
    tight = PolicyConfig(min_pixel_distance=0.01, max_mia_auc=0.6, max_reid_rate=0.1, max_closer_to_train=0.6,
                         min_accepted=50, max_tpr_at_low_fpr=0.1, min_mmL=0.2, max_dp_epsilon=2.0,
                         min_embedding_distance_ratio=0.8, copy_fpr=0.05, max_attempts=1)  # fmt: skip
    assert loose.stricter(tight) == tight and tight.stricter(loose) == tight
    assert PolicyConfig(max_dp_epsilon=3.0).stricter(PolicyConfig()).max_dp_epsilon == 3.0  # None is no limit
