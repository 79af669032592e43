"""The pool listing (issue 15): paginated, each page signed by the coordinator and bound to the
federation, the trust document's version and the page token asked for."""

from __future__ import annotations

import pytest

from common import exchange_pb2 as pb
from common.listing import ListingError, TrustVersionChanged, open_listing, sign_listing
from common.signing import load_private_key
from node.release.exchange_client import ExchangeClient
from server import exchange as exchange_mod
from tests.helpers_exchange import live_exchange, make_bundle, site_key

BUNDLE = {"bundle_id": "0" * 32, "site": "a", "sequence": 1, "sha256": "1" * 64, "size": 10, "n_samples": 2}


@pytest.fixture
def coordinator(tmp_path):
    return site_key(tmp_path, "coordinator")[0]


def _page(key, **kw):
    args = {"federation": "fed", "trust_version": 3, "site": "", "page_token": "", "next_page_token": ""} | kw
    return sign_listing([BUNDLE], key, **args)


def test_a_signed_page_opens(coordinator):
    bundles, token = open_listing(
        _page(coordinator, next_page_token="f" * 32),
        coordinator.public_key(),
        federation="fed",
        trust_version=3,
        site="",
        page_token="",
    )
    assert bundles == [BUNDLE] and token == "f" * 32


@pytest.mark.parametrize("case,error,match", [
    ("another key", ListingError, "not signed by the coordinator's key"),
    ("another federation", ListingError, "for federation 'other'"),
    ("another page", ListingError, "not the one asked for"),
    ("another site filter", ListingError, "not the one asked for"),
    ("another trust version", TrustVersionChanged, "trust version 2"),
])  # fmt: skip
def test_a_page_that_is_not_the_one_asked_for_is_refused(coordinator, tmp_path, case, error, match):
    page = {
        "another key": lambda: _page(site_key(tmp_path, "mallory")[0]),
        "another federation": lambda: _page(coordinator, federation="other"),
        "another page": lambda: _page(coordinator, page_token="e" * 32),
        "another site filter": lambda: _page(coordinator, site="b"),
        "another trust version": lambda: _page(coordinator, trust_version=2),
    }[case]()
    with pytest.raises(error, match=match):
        open_listing(page, coordinator.public_key(), federation="fed", trust_version=3, site="", page_token="")


def test_list_pages_through_a_pool_larger_than_a_page(tmp_path, monkeypatch):
    monkeypatch.setattr(exchange_mod, "LIST_PAGE_DEFAULT", 3)  # 7 bundles: pages of 3, 3 and 1
    priv, pem = site_key(tmp_path / "k", "a")
    with live_exchange(tmp_path / "coord") as ex:
        ex.trust.add("a", pem)
        ids = sorted(
            ex.store.put(make_bundle(tmp_path / str(i), priv, sequence=i + 1, seed=i), verify=ex.trust).bundle_id
            for i in range(7)
        )
        with ExchangeClient(ex.address, ex.ca_cert, timeout=10) as c:
            replies = list(c._pages(None))
            assert [len(r.bundles) for r in replies] == [3, 3, 1] and replies[-1].next_page_token == ""
            assert [r["bundle_id"] for r in c.list()] == ids
            version = ex.trust.snapshot()[0]
            coordinator_pub = load_private_key(ex.cd.coordinator_key).public_key()
            signed = c.signed_list(coordinator_pub, federation="test", trust_version=version)
            assert [r["bundle_id"] for r in signed] == ids
            with pytest.raises(TrustVersionChanged):
                c.signed_list(coordinator_pub, federation="test", trust_version=version - 1)
            # a page size beyond the server's cap is cut to it; a page token that is no bundle id is refused
            reply = c._stub.List(pb.ListRequest(page_size=10_000), timeout=10)
            assert len(reply.bundles) == 7
            with pytest.raises(Exception, match="page_token must be empty or a bundle id"):
                c._stub.List(pb.ListRequest(page_token="../x"), timeout=10)
