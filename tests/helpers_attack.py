"""The attack matrix's live federation: a mutual-TLS exchange on 127.0.0.1 with sites a, b, c
registered, and the checks every refused attack must pass (an error naming its cause, the store
unchanged, the server still serving)."""

from __future__ import annotations

import contextlib
import io
import sqlite3
import tarfile
import time
from pathlib import Path

import grpc
import pytest

from common.bundle import pack_bundle
from common.fileio import sha256_file
from common.tls import issue_client_cert
from node.release.exchange_client import ExchangeClient, ExchangeError
from tests.helpers_exchange import live_exchange, make_bundle, site_key

MAX = 4 * 1024 * 1024
SITES = ("a", "b", "c")


class Federation:
    """A live exchange with sites a, b, c registered (keys and client certificates)."""

    def __init__(self, ex, root: Path):
        self.ex, self.root = ex, root
        self.keys = {s: site_key(root / "keys", s) for s in SITES}
        self.certs = {s: issue_client_cert(ex.cd.ca_dir, root / "tls", s) for s in SITES}
        for s in SITES:
            ex.trust.add(s, self.keys[s][1])
        self.sequence = {s: 0 for s in SITES}
        self.n = 0

    def client(self, site: str) -> ExchangeClient:
        crt, key = self.certs[site]
        return ExchangeClient(self.ex.address, self.ex.ca_cert, timeout=20, client_cert=crt, client_key=key)

    def bundle(self, site: str, *, signer: str | None = None, **kw) -> Path:
        """A new valid bundle of `site` with its next sequence (signed by `signer`'s key if given)."""
        self.sequence[site] += 1
        self.n += 1
        kw.setdefault("sequence", self.sequence[site])
        return make_bundle(
            self.root / "bundles" / str(self.n), self.keys[signer or site][0], site=site, seed=1000 + self.n, **kw
        )

    def snapshot(self):
        """Everything a refused upload must leave unchanged (incoming/ is emptied after each upload)."""
        store = self.ex.store
        with sqlite3.connect(store.index_path) as db:
            rows = db.execute("SELECT * FROM bundles ORDER BY bundle_id").fetchall()
            removed = db.execute("SELECT * FROM removed ORDER BY bundle_id").fetchall()
        objects = {p.name: sha256_file(p) for p in store.objects.iterdir()}
        return objects, rows, removed, sorted(p.name for p in store.incoming.iterdir())

    def assert_unchanged(self, before) -> None:
        deadline = time.time() + 10  # a cancelled upload's server thread may still be cleaning up
        while self.snapshot() != before and time.time() < deadline:
            time.sleep(0.05)
        assert self.snapshot() == before

    def assert_still_serving(self) -> None:
        with self.client("b") as c:
            assert c.health()["status"] == "ok"
            rec = c.upload(self.bundle("b"))
            assert rec["bundle_id"] in {r["bundle_id"] for r in c.list("b")}


@contextlib.contextmanager
def live_federation(root: Path):
    """The live exchange under `root` with sites a, b, c registered, as a Federation."""
    with live_exchange(root / "coord", max_bundle_bytes=MAX, client_ca=True) as ex:
        yield Federation(ex, root)


def refused(fed, site: str, tar: Path, code: str, match: str, *, as_site: str | None = None) -> None:
    before = fed.snapshot()
    with fed.client(site) as c:
        with pytest.raises(ExchangeError, match=match) as e:
            c.upload(tar, site=as_site or site)
    assert e.value.code == code, str(e.value)
    fed.assert_unchanged(before)
    fed.assert_still_serving()


def repack(bundle_dir: Path) -> Path:
    bundle_dir.with_name(bundle_dir.name + ".tar").unlink(missing_ok=True)
    return pack_bundle(bundle_dir)


def tar_with(good_tar: Path, out: Path, extra: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """`good_tar`'s members followed by `extra` (TarInfo, data) members, written raw."""
    with tarfile.open(good_tar) as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
        for m in src:
            dst.addfile(m, src.extractfile(m))
        for info, data in extra:
            dst.addfile(info, io.BytesIO(data) if data is not None else None)
    return out


def creds(fed, site: str) -> grpc.ChannelCredentials:
    crt, key = fed.certs[site]
    return grpc.ssl_channel_credentials(
        fed.ex.ca_cert.read_bytes(), private_key=key.read_bytes(), certificate_chain=crt.read_bytes()
    )
