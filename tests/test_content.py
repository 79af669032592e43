"""Poison bundles (issue 15): signed, well-formed, and not the federation's data. The coordinator
refuses them with reason "content"; one that reaches a site's pool anyway is quarantined by the
loader instead of failing the round."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from common.bundle import build_bundle, pack_bundle
from common.content import ContentSpec
from common.signing import load_private_key
from node.release.exchange_client import ExchangeError, site_client
from node.release.publish import publish
from node.release.pull import load_pool_data, pull
from tests.helpers_bundle import resigned
from tests.helpers_exchange import PASSED_AUDIT, live_exchange, make_bundle, sample_set
from tests.test_publish_pull import _site


def _bundle(out, priv, *, images, labels, sequence=1):
    bid = build_bundle(
        out,
        images=images,
        labels=labels,
        audit=PASSED_AUDIT,
        datacard={"route": "plan"},
        site="a",
        sequence=sequence,
        signing_key=priv,
        config_digest="0" * 64,
    )
    return pack_bundle(out / bid)


def _replace_first_png(data: bytes):
    def edit(d):
        png = sorted((d / "bag" / "data" / "images").rglob("*.png"))[0]
        png.write_bytes(data)

    return edit


def _png(mode: str, size: int) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size)).save(buf, format="PNG")
    return buf.getvalue()


def _truncated_png() -> bytes:
    good = _png("L", 8)
    return good[:40] + good[-12:]  # the header is intact, the pixel data is gone


CASES = {  # the test federation: 8x8 grey images, 2 classes
    "images of another size": (
        lambda t, p: _bundle(t, p, images=sample_set(n=6, size=16)[0], labels=np.array([0, 1] * 3)),
        r"images/0/\d+\.png: a PNG L image of 16x16 pixels; "
        r"this federation's are grey 8-bit PNGs \(mode L\) of 8x8"),
    "labels outside the classes": (
        lambda t, p: _bundle(t, p, images=sample_set(n=6)[0], labels=np.array([0, 1, 2, 3, 4, 1])),
        r"labels.csv: label 2 is outside this federation's 2 classes"),
    "an RGB image": (lambda t, p: resigned(make_bundle(t, p), p, _replace_first_png(_png("RGB", 8))),
                     r"a PNG RGB image of 8x8 pixels"),
    "an image that does not decode": (
        lambda t, p: resigned(make_bundle(t, p), p, _replace_first_png(_truncated_png())),
        r"does not decode as an image"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_the_coordinator_refuses_poison_with_reason_content(tmp_path, case):
    make, match = CASES[case]
    with live_exchange(tmp_path / "coord", client_ca=True) as ex:
        a = _site(tmp_path, "a", ex, seed=1)
        with site_client(a) as c:
            with pytest.raises(ExchangeError, match=match) as e:
                c.upload(make(tmp_path / "poison", load_private_key(a.signing_key)), site="a")
        assert e.value.code == "INVALID_ARGUMENT"
        assert ex.store.list() == []


def test_a_site_quarantines_poison_that_reached_its_pool(tmp_path):
    """A bundle pooled by a coordinator that did not check content (an older one, or another
    federation's settings): the round trains on the rest."""
    with live_exchange(tmp_path / "coord", client_ca=True) as ex:
        a, b = _site(tmp_path, "a", ex, seed=1), _site(tmp_path, "b", ex, seed=2)
        good = publish(b)
        ex.store.content = None  # the check switched off: the poison gets in
        poison = ex.store.put(
            CASES["labels outside the classes"][0](tmp_path / "p", load_private_key(a.signing_key)), verify=ex.trust
        ).bundle_id
        assert sorted(pull(b)) == sorted([good, poison])
        route, data, labels = load_pool_data(b, spec=ContentSpec(n_classes=2, image_size=8), route="plan")
        assert route == "plan" and data.shape == (10, 8, 8) and set(labels.tolist()) <= {0, 1}
        assert (
            "outside this federation's 2 classes"
            in json.loads((b.pool / "quarantine.json").read_text())[poison]["reason"]
        )
        assert (b.pool / "quarantine" / poison).is_dir()


def test_a_run_that_completed_no_round_is_a_failure_and_status_says_why(tmp_path):
    from typer.testing import CliRunner

    from common.fileio import atomic_write_json
    from server.cli import app
    from server.coordinator import CoordinatorDir, run_failure

    results = {
        "completed": False,
        "rounds_completed": 0,
        "status": "finished:completed",
        "errors": [{"round": 1, "phase": "train", "site": "site-a", "error": "label 4 out of range"}],
    }
    failure = run_failure(results, 3)
    assert failure == "0 of 3 rounds completed; first error, round 1 train at site-a: label 4 out of range"
    assert run_failure({"completed": True}, 3) is None
    cd = CoordinatorDir(tmp_path / "coord")
    (cd.runs / "r1").mkdir(parents=True)
    atomic_write_json(cd.runs / "r1" / "results.json", {**results, "failure": failure})
    atomic_write_json(
        cd.runs / "latest.json",
        {"run_dir": "r1", "run_id": 7, "label": "finished", "status": "failed", "failure": failure},
    )
    out = CliRunner().invoke(app, ["status", "--dir", str(cd.root)])
    assert out.exit_code == 0, out.output
    assert "failed" in out.output and "0 of 3 rounds completed" in out.output and "label 4 out of range" in out.output
