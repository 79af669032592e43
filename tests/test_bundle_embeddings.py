"""Embedding bundles (the CVAE route): round trip, and every way a payload can lie after re-signing."""

import hashlib
import json
import struct
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import save as safetensors_bytes

from common.bundle import (
    BundleError,
    build_bundle,
    bundle_id_for,
    load_bundle_data,
    load_bundle_embeddings,
    load_bundle_images,
    verify_bundle,
)
from common.fileio import atomic_write_json
from node.release.pull import load_pool, load_pool_data
from tests.helpers_bundle import MAX, emb_file, embedding_set, make_embedding_bundle, repack, resigned, safetensors_file
from tests.helpers_exchange import PASSED_AUDIT, make_bundle, sample_set


def test_embedding_round_trip(tmp_path, key_a):
    priv, pem = key_a
    x, y = embedding_set()
    tar = make_embedding_bundle(tmp_path / "b", priv)
    vb = verify_bundle(tar, {"a": [pem]}, max_bytes=MAX, dest=tmp_path / "x")
    assert (vb.route, vb.n_samples, vb.predicate["route"], vb.predicate["n_samples"]) == ("cvae", 12, "cvae", 12)
    assert vb.bundle_id == bundle_id_for("a", x, y) and vb.bundle_id != bundle_id_for("a", *sample_set())
    assert sorted(p.name for p in (vb.dir / "bag" / "data").iterdir()) == ["embeddings.safetensors", "labels.csv"]
    assert (vb.dir / "bag" / "data" / "labels.csv").read_text().splitlines()[:2] == ["index,label", f"0,{y[0]}"]
    got_x, got_y = load_bundle_embeddings(vb.dir)
    assert got_x.dtype == np.float32 and got_y.dtype == np.int64 and got_x.flags.writeable
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)
    route, data, labels = load_bundle_data(vb.dir)
    assert route == "cvae"
    np.testing.assert_array_equal(data, x)
    np.testing.assert_array_equal(labels, y)
    card = json.loads((vb.dir / "bag" / "datacard.json").read_text())
    assert (card["route"], card["data_format"], card["embedding_dim"], card["n_samples"]) == (
        "cvae",
        "safetensors-float32",
        16,
        12,
    )
    assert "image_shape" not in card and "image_format" not in card
    with pytest.raises(BundleError, match="holds embeddings"):
        load_bundle_images(vb.dir)
    # the route goes into the datacard when the caller gives none
    tar = make_embedding_bundle(tmp_path / "c", priv, datacard={"description": "x"})
    vb = verify_bundle(tar, {"a": [pem]}, max_bytes=MAX)
    assert json.loads((vb.dir / "bag" / "datacard.json").read_text())["route"] == "cvae"


def test_image_bundle_id_is_unchanged(tmp_path):
    """Existing image bundles keep their ids: the v1 formula, recomputed here."""
    images, labels = sample_set()
    h = hashlib.sha256(
        b"plan-node-bundle-v1\0a\0" + b"[12, 8, 8]\0" + images.tobytes() + labels.astype("<i8").tobytes()
    )
    assert bundle_id_for("a", images, labels) == h.hexdigest()[:32]


def test_resign_helper_alone_keeps_a_bundle_valid(tmp_path, key_a):
    """The tampering tests below rely on resign producing a bundle that passes on its own."""
    priv, pem = key_a
    for tar in (make_embedding_bundle(tmp_path / "e", priv), make_bundle(tmp_path / "i", priv)):
        tar = resigned(tar, priv, lambda d: None)
        assert verify_bundle(tar, {"a": [pem]}, max_bytes=MAX).n_samples == 12


def test_changed_embedding_byte_fails_the_bag_digest(tmp_path, key_a):
    priv, pem = key_a
    tar = make_embedding_bundle(tmp_path / "b", priv)

    def flip(d):
        raw = bytearray(emb_file(d).read_bytes())
        raw[-5] ^= 0x01  # one bit of the last value: still a finite float32
        emb_file(d).write_bytes(bytes(raw))

    with pytest.raises(BundleError, match=r"data/embeddings\.safetensors: sha256 mismatch"):
        verify_bundle(repack(tar, flip), {"a": [pem]}, max_bytes=MAX, dest=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _set_card_route(route):
    def edit(d):
        p = d / "bag" / "datacard.json"
        p.write_text(json.dumps({**json.loads(p.read_text()), "route": route}, indent=2, sort_keys=True) + "\n")

    return edit


def test_route_that_contradicts_the_payload_is_refused(tmp_path, key_a):
    priv, pem = key_a
    keys = {"a": [pem]}
    emb = make_embedding_bundle(tmp_path / "e", priv)
    with pytest.raises(BundleError, match=r"datacard\.json: route is 'plan' but the payload holds embeddings"):
        verify_bundle(resigned(emb, priv, _set_card_route("plan")), keys, max_bytes=MAX)
    emb = make_embedding_bundle(tmp_path / "e2", priv)
    with pytest.raises(BundleError, match=r"predicate\.route is 'plan' but the payload holds embeddings"):
        verify_bundle(resigned(emb, priv, lambda d: None, route="plan"), keys, max_bytes=MAX)
    emb = make_embedding_bundle(tmp_path / "e3", priv)
    with pytest.raises(BundleError, match=r"predicate\.route is None but the payload holds embeddings"):
        verify_bundle(resigned(emb, priv, lambda d: None, route=None), keys, max_bytes=MAX)
    img = make_bundle(tmp_path / "i", priv)
    with pytest.raises(BundleError, match=r"predicate\.route is 'cvae' but the payload holds images"):
        verify_bundle(resigned(img, priv, lambda d: None, route="cvae"), keys, max_bytes=MAX)


def _huge_header(d):
    raw = emb_file(d).read_bytes()
    emb_file(d).write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])


def _second_tensor(d):
    x, _ = embedding_set()
    emb_file(d).write_bytes(safetensors_bytes({"embeddings": x, "extra": x[:1]}))


def _float64(d):
    x, _ = embedding_set()
    emb_file(d).write_bytes(safetensors_bytes({"embeddings": x.astype(np.float64)}))


def _shape_vs_offsets(d):  # header claims [12, 17] over the bytes of [12, 16]
    x, _ = embedding_set()
    header = {"embeddings": {"dtype": "F32", "shape": [12, 17], "data_offsets": [0, x.nbytes]}}
    emb_file(d).write_bytes(safetensors_file(header, x.tobytes()))


def _shape_vs_file_size(d):  # header and offsets say [12, 16]; the file holds one value more
    x, _ = embedding_set()
    header = {"embeddings": {"dtype": "F32", "shape": [12, 16], "data_offsets": [0, x.nbytes]}}
    emb_file(d).write_bytes(safetensors_file(header, x.tobytes() + b"\0" * 4))


def _rank_3(d):
    x, _ = embedding_set()
    emb_file(d).write_bytes(safetensors_bytes({"embeddings": x.reshape(12, 4, 4)}))


def _not_json(d):
    emb_file(d).write_bytes(struct.pack("<Q", 8) + b"{nope!!}" + b"\0" * 4)


def _duplicate_key(d):
    x, _ = embedding_set()
    t = json.dumps({"dtype": "F32", "shape": [12, 16], "data_offsets": [0, x.nbytes]})
    raw = ('{"embeddings": %s, "embeddings": %s}' % (t, t)).encode()
    emb_file(d).write_bytes(struct.pack("<Q", len(raw)) + raw + x.tobytes())


def _nan_value(d):
    x, _ = embedding_set()
    x[3, 5] = np.nan
    emb_file(d).write_bytes(safetensors_bytes({"embeddings": x}))


def _extra_payload_file(d):
    (d / "bag" / "data" / "images" / "0").mkdir(parents=True)
    (d / "bag" / "data" / "images" / "0" / "0.png").write_bytes(b"\x89PNG")


@pytest.mark.parametrize(
    "edit, message",
    [
        (_huge_header, r"declares a 1099511627776-byte header, over the limit of 1048576"),
        (_second_tensor, r"exactly one tensor 'embeddings', holds \['embeddings', 'extra'\]"),
        (_float64, r"dtype 'F64', expected 'F32'"),
        (_shape_vs_offsets, r"data_offsets \[0, 768\], expected \[0, 816\] for F32 \[12, 17\]"),
        (_shape_vs_file_size, r"860 bytes, but its 80-byte header and F32 \[12, 16\] data make 856"),
        (_rank_3, r"shape \[12, 4, 4\], expected \[N, D\]"),
        (_not_json, r"header is not valid JSON"),
        (_duplicate_key, r"header is not valid JSON .*duplicate key 'embeddings'"),
        (_nan_value, r"embedding \[3,5\] is nan, expected a finite value"),
        (_extra_payload_file, r"data/images/0/0\.png: unexpected in an embedding bundle"),
    ],
    ids=lambda v: getattr(v, "__name__", "")[1:] or None,
)
def test_bad_embeddings_file_is_refused_at_verify_time(tmp_path, key_a, edit, message):
    priv, pem = key_a
    tar = resigned(make_embedding_bundle(tmp_path / "b", priv), priv, edit)
    with pytest.raises(BundleError, match=message):
        verify_bundle(tar, {"a": [pem]}, max_bytes=MAX, dest=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _rewrite_labels(rows):
    def edit(d):
        (d / "bag" / "data" / "labels.csv").write_text("index,label\n" + "".join(f"{r}\n" for r in rows))

    return edit


@pytest.mark.parametrize(
    "rows, message",
    [
        ([f"{i},0" for i in range(12) if i != 4], r"line 6: index '5', expected 4"),  # missing
        ([f"{i},0" for i in range(4)] + ["3,0"] + [f"{i},0" for i in range(5, 12)], r"line 6: index '3', expected 4"),
        ([f"{i},0" for i in range(11)], r"11 rows but embeddings\.safetensors holds 12"),
        ([f"{i},0" for i in range(13)], r"line 14: more rows than the 12 embeddings"),
        ([f"{i},0" for i in range(11)] + ["11,100"], r"line 13: bad row \['11', '100'\]"),
        (["0,0", "01,0"] + [f"{i},0" for i in range(2, 12)], r"line 3: index '01', expected 1"),
    ],
    ids=["missing", "duplicated", "too-few", "too-many", "label-100", "not-canonical"],
)
def test_bad_embedding_labels_are_refused(tmp_path, key_a, rows, message):
    priv, pem = key_a
    tar = resigned(make_embedding_bundle(tmp_path / "b", priv), priv, _rewrite_labels(rows))
    with pytest.raises(BundleError, match=rf"data/labels\.csv.*{message}"):
        verify_bundle(tar, {"a": [pem]}, max_bytes=MAX)


def test_build_refuses_bad_embeddings_and_leaves_nothing(tmp_path, key_a):
    x, y = embedding_set()
    images, _ = sample_set()
    out = tmp_path / "out"
    out.mkdir()
    nan, inf = x.copy(), x.copy()
    nan[2, 3], inf[0, 0] = np.nan, np.inf
    common = dict(datacard={}, site="a", sequence=1, signing_key=key_a[0], config_digest="0" * 64)
    cases = [
        (dict(embeddings=nan, labels=y), r"embeddings must be finite: \[2,3\] is nan"),
        (dict(embeddings=inf, labels=y), r"embeddings must be finite: \[0,0\] is inf"),
        (dict(embeddings=x.astype(np.float64), labels=y), "embeddings must be float32 .*float64"),
        (dict(embeddings=x.reshape(12, 4, 4), labels=y), r"embeddings must be float32 \[N,D\].*\(12, 4, 4\)"),
        (
            dict(embeddings=x, labels=y[:-1]),
            "need as many labels as embeddings, at least one: 12 embeddings, 11 labels",
        ),
        (dict(embeddings=x, images=images, labels=y), "exactly one payload.*got both"),
        (dict(labels=y), "exactly one payload.*got neither"),
        (dict(embeddings=x, labels=y, datacard={"route": "plan"}), "datacard route 'plan' contradicts the payload"),
        (dict(images=images, labels=y, datacard={"route": "cvae"}), "datacard route 'cvae' contradicts the payload"),
        # fails after the payload is written: the half-built bundle must go too
        (dict(embeddings=x, labels=y, audit={**PASSED_AUDIT, "mia_auc": float("nan")}), "audit: not plain JSON"),
    ]
    for kwargs, message in cases:
        with pytest.raises(BundleError, match=message):
            build_bundle(out, **{"audit": PASSED_AUDIT, **common, **kwargs})
        assert list(out.iterdir()) == [], message
    with pytest.raises(BundleError, match="embeddings must be float32"):
        build_bundle(tmp_path / "never", embeddings=x.astype(np.float64), labels=y, audit=PASSED_AUDIT, **common)
    assert not (tmp_path / "never").exists()


def _pool(tmp_path, pem, tars):
    """A workspace stand-in whose pool/ holds the verified `tars` and their index."""
    ws = SimpleNamespace(pool=tmp_path / "ws" / "pool")
    index = {}
    for tar in tars:
        vb = verify_bundle(tar, {"a": [pem]}, max_bytes=MAX, dest=ws.pool / tar.stem)
        index[vb.bundle_id] = {"site": vb.site, "sequence": vb.sequence, "route": vb.route, "n_samples": vb.n_samples}
    atomic_write_json(ws.pool / "index.json", index)
    return ws


def test_load_pool_data(tmp_path, key_a):
    priv, pem = key_a
    empty = SimpleNamespace(pool=tmp_path / "none")
    route, data, labels = load_pool_data(empty)
    assert route is None and data.shape == (0, 0, 0) and labels.shape == (0,)
    tars = [make_embedding_bundle(tmp_path / "b", priv, seed=s, sequence=s) for s in (1, 2)]
    ws = _pool(tmp_path, pem, tars)
    route, data, labels = load_pool_data(ws)
    want = {t.stem: embedding_set(seed=s) for t, s in zip(tars, (1, 2))}
    assert route == "cvae" and data.dtype == np.float32 and data.shape == (24, 16)
    np.testing.assert_array_equal(data, np.concatenate([want[k][0] for k in sorted(want)]))
    np.testing.assert_array_equal(labels, np.concatenate([want[k][1] for k in sorted(want)]))
    with pytest.raises(BundleError, match="the pool holds embeddings"):
        load_pool(ws)
    images_ws = _pool(tmp_path / "i", pem, [make_bundle(tmp_path / "i", priv)])
    route, data, _ = load_pool_data(images_ws)
    assert route == "plan" and data.shape == (12, 8, 8)
    assert load_pool(images_ws)[0].shape == (12, 8, 8)


def test_load_pool_data_refuses_mixed_routes_and_dims(tmp_path, key_a):
    priv, pem = key_a
    tars = [make_bundle(tmp_path / "b", priv), make_embedding_bundle(tmp_path / "b", priv, sequence=2)]
    ws = _pool(tmp_path, pem, tars)
    second = sorted(t.stem for t in tars)[1]
    with pytest.raises(BundleError, match=rf"{second}: holds .* but pooled bundle \w+ holds .*one route"):
        load_pool_data(ws)
    with pytest.raises(BundleError, match=second):
        load_pool(ws)
    tars = [make_embedding_bundle(tmp_path / "c", priv, d=d, sequence=d) for d in (8, 16)]
    ws = _pool(tmp_path / "c", pem, tars)
    second = sorted(t.stem for t in tars)[1]
    with pytest.raises(
        BundleError, match=rf"{second}: embeddings are \d+-dimensional, pooled bundle \w+'s \d+-dimensional"
    ):
        load_pool_data(ws)
