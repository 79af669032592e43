"""The federation report's PNG curves."""

from __future__ import annotations

import io

from PIL import Image

from server.report import _series, write_curves


def _run(acc: list[float]) -> dict:
    return {
        "per_site": {
            str(r + 1): {
                "evaluate": {
                    "a": {"accuracy": a, "auroc": a, "local-only-accuracy": 0.6, "local-only-auroc": 0.7},
                    "b": {"error": "ClientApp raised"},
                }
            }
            for r, a in enumerate(acc)
        }
    }


def test_series_follow_rounds_and_skip_errors():
    assert _series(_run([0.5, 0.7, 0.9]), "accuracy") == {"a": ([1, 2, 3], [0.5, 0.7, 0.9])}
    assert _series(_run([0.5]), "local-only-auroc") == {"a": ([1], [0.7])}


def test_curves_png_with_and_without_a_baseline(tmp_path):
    for baseline in (None, _run([0.8, 0.85, 0.9])):
        path = tmp_path / "curves.png"
        write_curves(path, _run([0.5, 0.7, 0.9]), baseline)
        img = Image.open(io.BytesIO(path.read_bytes()))
        assert img.format == "PNG" and img.size == (1000, 400)
