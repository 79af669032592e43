"""The route registry (node/routes.py): one description per route, consistent with itself."""

import pytest

from node.routes import ROUTES, route


def test_unknown_route_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown route 'gan'; expected one of \['cvae', 'plan'\]"):
        route("gan")


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_every_model_a_later_stage_reads_is_one_train_writes(name):
    r = route(name)
    assert r.name == name
    assert set(r.synth_reads) <= set(r.model_names)
    assert set(r.audit_reads) <= set(r.model_names)
    assert r.records in ("images", "embeddings")
