from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.config import DataConfig
from node.site.data import DataError, load_dataset

SHARED_DATA = Path(__file__).parents[1] / ".." / "shared" / "data"


def _png(path: Path, value: int, size=(20, 20), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, value, value)).save(path)


def test_phantom_and_max_images():
    d = load_dataset(DataConfig(phantom={"n_patients": 6, "images_per_patient": 2}, image_size=16))
    assert d.images.shape == (12, 16, 16) and d.labels.dtype == np.int64
    sub = load_dataset(DataConfig(phantom={"n_patients": 6, "images_per_patient": 2}, image_size=16, max_images=5))
    again = load_dataset(DataConfig(phantom={"n_patients": 6, "images_per_patient": 2}, image_size=16, max_images=5))
    assert len(sub) == 5 and np.array_equal(sub.images, again.images)


def test_npz_medmnist_style(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for p, n in (("train_", 5), ("val_", 2), ("test_", 3)):
        arrays[f"{p}images"] = rng.integers(0, 255, (n, 28, 28, 3), dtype=np.uint8)  # RGB -> grey
        arrays[f"{p}labels"] = rng.integers(0, 2, (n, 1)).astype(np.uint8)
    np.savez(tmp_path / "m.npz", **arrays)
    d = load_dataset(DataConfig(source="npz", path=tmp_path / "m.npz", image_size=16))
    assert d.images.shape == (10, 16, 16) and d.labels.shape == (10,)
    assert len(np.unique(d.patient_ids)) == 10  # no patient ids: each image its own patient


def test_npz_missing_arrays(tmp_path):
    np.savez(tmp_path / "bad.npz", pictures=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(DataError, match="bad.npz.*images"):
        load_dataset(DataConfig(source="npz", path=tmp_path / "bad.npz"))


def test_npz_object_array_is_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", images=np.zeros((2, 8, 8), np.uint8), labels=np.array([1, "a"], dtype=object))
    with pytest.raises(DataError, match="obj.npz"):
        load_dataset(DataConfig(source="npz", path=tmp_path / "obj.npz"))


def test_folder(tmp_path):
    for cls, v in (("benign", 10), ("malignant", 200)):
        for i in range(3):
            _png(tmp_path / "imgs" / cls / f"{i}.png", v + i, mode="RGB" if i == 0 else "L")
    d = load_dataset(DataConfig(source="folder", path=tmp_path / "imgs", image_size=8))
    assert d.images.shape == (6, 8, 8)
    assert list(d.labels) == [0, 0, 0, 1, 1, 1]  # sorted class names
    assert d.images[3].mean() > 150


def test_folder_corrupt_png_names_the_file(tmp_path):
    _png(tmp_path / "imgs" / "a" / "ok.png", 3)
    _png(tmp_path / "imgs" / "b" / "ok.png", 3)
    (tmp_path / "imgs" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(DataError, match=r"broken\.png.*cannot read as an image"):
        load_dataset(DataConfig(source="folder", path=tmp_path / "imgs"))


def test_csv_with_and_without_header(tmp_path):
    for i in range(4):
        _png(tmp_path / "img" / f"{i}.png", 40 * i)
    (tmp_path / "with.csv").write_text(
        "path,label,patient_id\nimg/0.png,0,p1\nimg/1.png,0,p1\nimg/2.png,1,p2\nimg/3.png,1,p3\n"
    )
    d = load_dataset(DataConfig(source="csv", path=tmp_path / "with.csv", image_size=8))
    assert list(d.labels) == [0, 0, 1, 1] and list(d.patient_ids) == ["p1", "p1", "p2", "p3"]
    (tmp_path / "without.csv").write_text("img/0.png,0\nimg/1.png,1\n")
    d = load_dataset(DataConfig(source="csv", path=tmp_path / "without.csv", image_size=8))
    assert list(d.labels) == [0, 1] and len(set(d.patient_ids)) == 2


@pytest.mark.parametrize(
    "row, message",
    [
        ("img/0.png,zero", r"row 3.*not an integer"),
        ("img/0.png", r"row 3.*expected 'path,label"),
        ("img/missing.png,1", r"missing\.png.*row 3.*not found"),
    ],
)
def test_csv_bad_row_names_file_and_row(tmp_path, row, message):
    _png(tmp_path / "img" / "0.png", 1)
    (tmp_path / "m.csv").write_text(f"path,label\nimg/0.png,0\n{row}\n")
    with pytest.raises(DataError, match=message):
        load_dataset(DataConfig(source="csv", path=tmp_path / "m.csv"))


def test_breastmnist_from_shared_data():
    path = SHARED_DATA / "breastmnist.npz"
    if not path.exists():
        pytest.skip(f"real data not present at {path} (a fresh clone has no ../shared)")
    d = load_dataset(DataConfig(source="npz", path=path, image_size=32))
    assert d.images.shape == (780, 32, 32) and set(np.unique(d.labels)) == {0, 1}
