import json
import tarfile

import numpy as np
import pytest

from common.bundle import (
    ATTESTATION,
    BundleError,
    build_bundle,
    load_bundle_images,
    pack_bundle,
    read_bundle_site,
    verify_bundle,
)
from tests.helpers_bundle import MAX, repack
from tests.helpers_exchange import PASSED_AUDIT, make_bundle, sample_set, site_key


def test_round_trip(tmp_path, key_a):
    priv, pem = key_a
    tar = make_bundle(tmp_path / "b", priv)
    assert read_bundle_site(tar) == "a"
    vb = verify_bundle(tar, {"a": [pem]}, max_bytes=MAX, dest=tmp_path / "x")
    assert (vb.site, vb.sequence, vb.n_samples) == ("a", 1, 12)
    assert vb.statement["_type"] == "https://in-toto.io/Statement/v1"
    assert vb.statement["subject"][0]["name"] == "tagmanifest-sha256.txt"
    assert vb.predicate["audit"] == PASSED_AUDIT and vb.predicate["dp_epsilon"] is None
    images, labels = load_bundle_images(vb.dir)
    want_i, want_l = sample_set()
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    np.testing.assert_array_equal(images, want_i)
    np.testing.assert_array_equal(labels, want_l)
    card = json.loads((vb.dir / "bag" / "datacard.json").read_text())
    assert card["site"] == "a" and card["n_samples"] == 12 and card["config_digest"] == "0" * 64
    assert vb.route == "plan" and vb.predicate["route"] == "plan"
    assert card["route"] == "plan" and card["data_format"] == "png-grey8" and card["image_shape"] == [8, 8]
    assert "embedding_dim" not in card


def test_pack_is_deterministic_and_regular_files_only(tmp_path, key_a):
    tar = make_bundle(tmp_path / "b", key_a[0])
    first = tar.read_bytes()
    tar.unlink()
    assert pack_bundle(tar.with_suffix("")).read_bytes() == first
    with tarfile.open(tar) as tf:
        names = tf.getnames()
        assert all(m.isreg() for m in tf.getmembers())
    assert names == sorted(names) and ATTESTATION in names


def test_same_set_same_id_and_existing_bundle_refused(tmp_path, key_a):
    tar = make_bundle(tmp_path / "b", key_a[0])
    with pytest.raises(BundleError, match="already exists"):
        make_bundle(tmp_path / "b", key_a[0], sequence=2)
    assert len([p for p in (tmp_path / "b").iterdir() if p.is_dir()]) == 1  # no half-built leftovers
    assert tar.exists()


def test_tampered_png_is_rejected_naming_the_file(tmp_path, key_a):
    priv, pem = key_a
    tar = make_bundle(tmp_path / "b", priv)

    def flip(d):
        png = sorted((d / "bag" / "data" / "images").rglob("*.png"))[0]
        raw = bytearray(png.read_bytes())
        raw[-20] ^= 0xFF
        png.write_bytes(bytes(raw))
        flip.name = png.relative_to(d / "bag").as_posix()

    tar = repack(tar, flip)
    with pytest.raises(BundleError, match=rf"{flip.name}: sha256 mismatch"):
        verify_bundle(tar, {"a": [pem]}, max_bytes=MAX, dest=tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing left extracted


def test_tampered_audit_json_is_rejected(tmp_path, key_a):
    priv, pem = key_a
    tar = make_bundle(tmp_path / "b", priv, audit={**PASSED_AUDIT, "mia_auc": 0.9})

    def edit(d):
        p = d / "bag" / "audit.json"
        p.write_text(p.read_text().replace("0.9", "0.5"))

    with pytest.raises(BundleError, match=r"audit\.json: sha256 mismatch"):
        verify_bundle(repack(tar, edit), {"a": [pem]}, max_bytes=MAX)


def test_regenerated_manifests_do_not_match_the_signed_subject(tmp_path, key_a):
    """An attacker who rewrites the manifests consistently still cannot forge the signed digest."""
    priv, pem = key_a
    tar_1 = make_bundle(tmp_path / "b", priv, seed=1)
    tar_2 = make_bundle(tmp_path / "b", priv, seed=2, sequence=2)

    def swap(d):  # a valid signature by the right key, but over another bag
        (d / ATTESTATION).write_bytes((tar_2.with_suffix("") / ATTESTATION).read_bytes())

    with pytest.raises(BundleError, match="does not match the signed subject digest"):
        verify_bundle(repack(tar_1, swap), {"a": [pem]}, max_bytes=MAX)


def test_unregistered_key_and_site_are_rejected(tmp_path, key_a):
    priv_a, pem_a = key_a
    priv_x, pem_x = site_key(tmp_path / "keys", "x")
    tar = make_bundle(tmp_path / "b", priv_x, site="a")  # claims site a, signed by another key
    with pytest.raises(BundleError, match="signature does not verify against any registered key of site 'a'") as e:
        verify_bundle(tar, {"a": [pem_a]}, max_bytes=MAX)
    assert e.value.reason == "untrusted"
    tar = make_bundle(tmp_path / "c", priv_x, site="x")
    with pytest.raises(BundleError, match="site 'x' is not registered"):
        verify_bundle(tar, {"a": [pem_a]}, max_bytes=MAX)


def test_failed_audit_is_rejected(tmp_path, key_a):
    priv, pem = key_a
    tar = make_bundle(tmp_path / "b", priv, audit={**PASSED_AUDIT, "passed": False})
    with pytest.raises(BundleError, match="audit did not pass") as e:
        verify_bundle(tar, {"a": [pem]}, max_bytes=MAX)
    assert e.value.reason == "policy"


def test_extra_file_in_bag_is_rejected(tmp_path, key_a):
    priv, pem = key_a
    tar = make_bundle(tmp_path / "b", priv)
    tar = repack(tar, lambda d: (d / "bag" / "fetch.txt").write_text("http://x 1 data/y\n"))
    with pytest.raises(BundleError, match="bag/fetch.txt: unexpected file"):
        verify_bundle(tar, {"a": [pem]}, max_bytes=MAX)


def test_build_refuses_bad_arrays(tmp_path, key_a):
    images, labels = sample_set()
    with pytest.raises(BundleError, match="images must be uint8"):
        build_bundle(
            tmp_path,
            images=images.astype(np.float32),
            labels=labels,
            audit=PASSED_AUDIT,
            datacard={},
            site="a",
            sequence=1,
            signing_key=key_a[0],
            config_digest="0" * 64,
        )
    with pytest.raises(BundleError, match="need as many labels as images"):
        build_bundle(
            tmp_path,
            images=images,
            labels=labels[:-1],
            audit=PASSED_AUDIT,
            datacard={},
            site="a",
            sequence=1,
            signing_key=key_a[0],
            config_digest="0" * 64,
        )


def test_verify_never_touches_a_non_empty_destination(tmp_path, key_a):
    priv, pem = key_a
    tar = make_bundle(tmp_path / "b", priv)
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "precious").write_text("keep me")
    with pytest.raises(BundleError, match="not empty"):
        verify_bundle(tar, {"a": [pem]}, max_bytes=MAX, dest=tmp_path / "dest")
    assert (tmp_path / "dest" / "precious").read_text() == "keep me"
