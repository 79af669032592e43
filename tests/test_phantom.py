import numpy as np

from node.site.phantom import make_phantom


def _make(seed=0, **kw):
    args = dict(n_patients=12, images_per_patient=4, n_classes=3, size=32, seed=seed) | kw
    return make_phantom(**args)


def test_shapes_types_and_determinism():
    x, y, p = _make()
    assert x.shape == (48, 32, 32) and x.dtype == np.uint8
    assert y.dtype == np.int64 and set(y) == {0, 1, 2}
    assert p.shape == (48,) and len(np.unique(p)) == 12
    x2, y2, p2 = _make()
    assert np.array_equal(x, x2) and np.array_equal(y, y2) and np.array_equal(p, p2)
    assert not np.array_equal(x, _make(seed=1)[0])


def test_one_class_per_patient():
    _, y, p = _make()
    for pid in np.unique(p):
        assert len(np.unique(y[p == pid])) == 1


def test_images_of_a_patient_look_alike():
    x, _, p = _make(n_patients=20)
    f = x.reshape(len(x), -1) / 255.0
    d = ((f[:, None] - f[None]) ** 2).mean(-1)
    same = p[:, None] == p[None]
    np.fill_diagonal(same, False)
    other = p[:, None] != p[None]
    assert d[same].mean() < 0.5 * d[other].mean()
    np.fill_diagonal(d, np.inf)
    assert (p[d.argmin(1)] == p).mean() > 0.9  # nearest neighbour is (almost always) the same patient
    assert not np.array_equal(x[0], x[1])  # acquisitions differ
