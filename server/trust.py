"""The coordinator's trust store: which Ed25519 public keys speak for which site.

Persisted in SQLite (`path`, e.g. coord/trust.db); every change is one transaction:

    sites(site PRIMARY KEY, pem, added_at)      the current key of each registered site
    revoked(site, pem, added_at, revoked_at)    keys that no longer speak for their site

A site has one current key for now. Rotation (a second key, then retiring the first) is a
later issue, so adding a different key for a registered site is refused; revoking the site
and adding the new key is the manual way round. PEM is stored normalised.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import sqlite3
from pathlib import Path
from typing import Iterator

from common.signing import SigningKeyError, load_public_key, public_pem

_SITE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sites (site TEXT PRIMARY KEY, pem TEXT NOT NULL, added_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS revoked (site TEXT NOT NULL, pem TEXT NOT NULL, added_at TEXT NOT NULL, revoked_at TEXT NOT NULL);
"""


class TrustError(ValueError):
    """A trust-store operation is refused or its file is invalid; the message says why."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


class TrustStore:
    """Registered site keys in the SQLite file `path` (created when missing)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        # One short-lived connection per operation: safe from any server thread.
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except sqlite3.Error as e:
            raise TrustError(f"{self.path}: cannot open trust store ({e})") from None
        try:
            yield db
        except sqlite3.DatabaseError as e:
            raise TrustError(f"{self.path}: trust store error ({e})") from None
        finally:
            db.close()

    def add(self, site: str, public_key_pem: str) -> None:
        """Register `site` with an Ed25519 public key (PEM). Re-adding the same key is a no-op."""
        if not isinstance(site, str) or not _SITE.match(site):
            raise TrustError(f"site name {site!r} must match {_SITE.pattern}")
        try:
            # bytes: always parsed as PEM text, never taken for a file name
            raw = public_key_pem.encode() if isinstance(public_key_pem, str) else public_key_pem
            pem = public_pem(load_public_key(raw))  # normalised, and checked to be Ed25519
        except SigningKeyError as e:
            raise TrustError(f"site {site!r}: {e}") from None
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT pem FROM sites WHERE site = ?", (site,)).fetchone()
            if row is not None:
                db.execute("ROLLBACK")
                if row[0] == pem:
                    return
                raise TrustError(
                    f"site {site!r} is already registered with another key; key rotation is not "
                    f"supported yet (revoke the site first, then add the new key)"
                )
            db.execute("INSERT INTO sites VALUES (?, ?, ?)", (site, pem, _now()))
            db.execute("COMMIT")

    def revoke(self, site: str) -> None:
        """Retire every key of `site`: its bundles are refused from now on."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT pem, added_at FROM sites WHERE site = ?", (site,)).fetchone()
            if row is None:
                db.execute("ROLLBACK")
                raise TrustError(f"site {site!r} is not registered")
            db.execute("INSERT INTO revoked VALUES (?, ?, ?, ?)", (site, row[0], row[1], _now()))
            db.execute("DELETE FROM sites WHERE site = ?", (site,))
            db.execute("COMMIT")

    def keys(self, site: str) -> list[str]:
        """The current PEM public keys of `site`; empty if it is not registered."""
        with self._db() as db:
            return [r[0] for r in db.execute("SELECT pem FROM sites WHERE site = ?", (site,))]

    def all(self) -> dict[str, list[str]]:
        """site -> current PEM public keys, for every registered site."""
        out: dict[str, list[str]] = {}
        with self._db() as db:
            for site, pem in db.execute("SELECT site, pem FROM sites ORDER BY site"):
                out.setdefault(site, []).append(pem)
        return out

    def sites(self) -> list[str]:
        with self._db() as db:
            return [r[0] for r in db.execute("SELECT site FROM sites ORDER BY site")]
