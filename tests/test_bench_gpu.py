"""bench/gpu.py: its --quick run on the CPU goes through every part and records each one's seconds.
Correctness only: no timing is asserted (the numbers that matter come from a GPU)."""

import json

import pytest
import torch

from bench import gpu


@pytest.mark.slow  # about a minute on 2 CPU cores
def test_the_quick_cpu_run_records_every_part(tmp_path):
    out = tmp_path / "gpu.json"
    res = gpu.main(["--device", "cpu", "--quick", "--out", str(out), "--site-dir", str(tmp_path / "site")])

    data = json.loads(out.read_text())
    assert list(res["parts"]) == list(gpu.PARTS) and set(data["parts"]) == set(gpu.PARTS)  # the file's keys are sorted
    for name, part in data["parts"].items():
        assert part["status"] == "ok", (name, part.get("traceback"))
        assert part["seconds"] > 0, name
        assert "max_memory_allocated_mib" not in part  # CUDA only
    env = data["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and "gpu" not in env
    assert data["profile"] == "cpu" and data["quick"] is True

    gan = data["parts"]["gan"]["sizes"]["32"]
    assert gan["steps_timed"] == 4 and gan["steps_per_s"] > 0 and gan["images_per_s"] > 0
    inv = data["parts"]["invert"]
    assert inv["images"] == 16 and inv["codes_shape"] == [16, 64] and inv["seconds_per_image"] > 0
    walk = data["parts"]["walk"]
    assert walk["paths"] == 4 and walk["reference_paths_timed"] >= 1
    assert walk["seconds_reference"] > 0 and walk["seconds_batched_same_paths"] > 0
    assert walk["seconds_batched_all_paths"] > 0 and walk["reference"] == "bench.walk_reference.reference_walk"
    for objective in walk["mean_loss_same_paths"].values():
        assert set(objective) == {"reference", "batched"}
    audit = data["parts"]["audit"]
    assert audit["target_reached"] and [r["n_candidates"] for r in audit["rungs"]] == [100]
    rung = audit["rungs"][0]
    assert (rung["n_train"], rung["n_holdout"]) == (100, 50) and rung["seconds"] > 0
    assert 0 < rung["seconds_copy_detector"] <= rung["seconds"]
    site = data["parts"]["site"]
    assert list(res["parts"]["site"]["stages"]) == ["ingest", "train", "synthesize", "audit", "publish"]
    assert all(s["seconds"] > 0 for s in site["stages"].values())
    assert all(site["stages"][s]["ran"] for s in ("ingest", "train", "synthesize", "audit"))
    assert site["cuts"]["models.gan.steps"] == [600, 10]
    if site["counts"]["audit_passed"]:  # the relaxed gate nearly always passes; publish then built a bundle
        bundle = site["stages"]["publish"]["bundle"]
        assert (tmp_path / "site" / "bundles" / f"{bundle}.tar").exists()


def test_without_cuda_the_default_device_is_an_error_that_names_the_cpu_option(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cpu"):
        gpu._device(None)
    with pytest.raises(SystemExit, match="CUDA is not available"):
        gpu._device("cuda")
    assert gpu._device("cpu") == torch.device("cpu")
