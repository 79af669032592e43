import numpy as np

from node.site.phantom import make_phantom
from node.site.splits import split_by_patient


def test_no_patient_in_two_splits_and_deterministic():
    _, y, p = make_phantom(n_patients=40, images_per_patient=3, n_classes=2, size=8, seed=0)
    s = split_by_patient(p, train=0.5, holdout=0.25, seed=3, labels=y)
    assert sorted(np.concatenate(list(s.values())).tolist()) == list(range(len(p)))
    sets = {k: set(p[v]) for k, v in s.items()}
    assert (
        not (sets["train"] & sets["holdout"])
        and not (sets["train"] & sets["test"])
        and not (sets["holdout"] & sets["test"])
    )
    again = split_by_patient(p, train=0.5, holdout=0.25, seed=3, labels=y)
    assert all(np.array_equal(s[k], again[k]) for k in s)
    other = split_by_patient(p, train=0.5, holdout=0.25, seed=4, labels=y)
    assert not np.array_equal(s["train"], other["train"])
    assert all(v.dtype == np.int64 for v in s.values())


def test_stratified_by_class():
    _, y, p = make_phantom(n_patients=40, images_per_patient=2, n_classes=2, size=8, seed=0)
    s = split_by_patient(p, train=0.5, holdout=0.25, seed=0, labels=y)
    for v in s.values():
        counts = np.bincount(y[v], minlength=2)
        assert abs(counts[0] - counts[1]) <= 2
    assert len(np.unique(p[s["train"]])) == 20


def test_without_labels_each_image_its_own_patient():
    ids = np.array([f"i{i}" for i in range(100)])
    s = split_by_patient(ids, train=0.6, holdout=0.2, seed=0)
    assert [len(s[k]) for k in ("train", "holdout", "test")] == [60, 20, 20]
