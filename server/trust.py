"""The coordinator's trust store: which Ed25519 public keys speak for which site, and for which bundles.

Persisted in SQLite (`path`, e.g. coord/trust.db); every change is one transaction:

    keys(site, key_id, pem, added_at, valid_after, valid_until, retired_at, revoked_at)
    meta('version', n)   grows by one with every change: the published trust document's version,
                         which receivers refuse to see go back (common.trustdoc)

Validity windows are per-site bundle *sequence numbers*, not times. A key is valid for a bundle
whose signed `predicate.sequence` s satisfies  valid_after < s  and (valid_until is NULL or
s <= valid_until). Why sequences: a bundle's timestamps are the signer's own claim (a thief with
an old key could backdate), whereas the coordinator's store enforces that each site's sequence
only grows. Rotating at the site's last stored sequence L closes the old key at L and opens the
new one after L; the store refuses any new upload with a sequence <= L as a replay, so the old
key can only ever vouch for bundles that were already pooled before the rotation.

    add      a site's first key (valid_after 0, open-ended)
    rotate   close the current key at L, add the new one from L (the caller passes L)
    revoke   a key, or every key of a site, is invalid for every sequence from now on; the
             caller removes that key's bundles from the pool (server.store)

Databases written by the first version (tables `sites` and `revoked`) are migrated on open.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from common import errors
from common.signing import SigningKeyError, key_id, load_public_key, public_pem
from server.transaction import write_transaction

_SITE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    site TEXT NOT NULL,
    key_id TEXT NOT NULL,
    pem TEXT NOT NULL,
    added_at TEXT NOT NULL,
    valid_after INTEGER NOT NULL,
    valid_until INTEGER,
    retired_at TEXT,
    revoked_at TEXT,
    PRIMARY KEY (site, key_id)
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('version', 1);
"""


class TrustError(ValueError):
    """A trust-store operation is refused or its file is invalid; the message says why."""

    exit_code = errors.VERIFY


@dataclass(frozen=True)
class KeyEntry:
    """One registered key of a site and the bundle sequences it may sign."""

    site: str
    key_id: str
    pem: str
    added_at: str
    valid_after: int  # valid for sequence > valid_after
    valid_until: int | None  # ... and sequence <= valid_until; None: open-ended (the current key)
    retired_at: str | None  # when a rotation closed it
    revoked_at: str | None  # when it was revoked: valid for nothing

    @property
    def status(self) -> str:
        return "revoked" if self.revoked_at else "retired" if self.valid_until is not None else "current"

    def window(self) -> dict:
        """What receivers need (common.trustdoc / common.bundle): pem and the sequence window."""
        return {
            "key_id": self.key_id,
            "pem": self.pem,
            "valid_after": self.valid_after,
            "valid_until": self.valid_until,
        }

    def as_dict(self) -> dict:
        return {**asdict(self), "status": self.status}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def _normalise(site: str, public_key_pem: str | bytes) -> tuple[str, str]:
    """(PEM normalised, key id) of an Ed25519 public key given as PEM text; TrustError otherwise."""
    if not isinstance(site, str) or not _SITE.match(site):
        raise TrustError(f"site name {site!r} must match {_SITE.pattern}")
    try:
        # bytes: always parsed as PEM text, never taken for a file name
        raw = public_key_pem.encode() if isinstance(public_key_pem, str) else public_key_pem
        key = load_public_key(raw)
    except SigningKeyError as e:
        raise TrustError(f"site {site!r}: {e}") from None
    return public_pem(key), key_id(key)


class TrustStore:
    """Registered site keys in the SQLite file `path` (created when missing)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(_SCHEMA)
            self._migrate_v1(db)

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        # One short-lived connection per operation: safe from any server thread and process.
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

    @staticmethod
    def _migrate_v1(db: sqlite3.Connection) -> None:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "sites" not in tables:
            return
        with write_transaction(db):
            for site, pem, added in db.execute("SELECT site, pem, added_at FROM sites").fetchall():
                db.execute(
                    "INSERT OR IGNORE INTO keys VALUES (?, ?, ?, ?, 0, NULL, NULL, NULL)",
                    (site, key_id(load_public_key(pem.encode())), pem, added),
                )
            if "revoked" in tables:
                for site, pem, added, revoked in db.execute(
                    "SELECT site, pem, added_at, revoked_at FROM revoked"
                ).fetchall():
                    db.execute(
                        "INSERT OR IGNORE INTO keys VALUES (?, ?, ?, ?, 0, NULL, NULL, ?)",
                        (site, key_id(load_public_key(pem.encode())), pem, added, revoked),
                    )
                db.execute("DROP TABLE revoked")
            db.execute("DROP TABLE sites")

    @staticmethod
    def _current(db: sqlite3.Connection, site: str) -> tuple | None:
        return db.execute(
            "SELECT key_id, pem FROM keys WHERE site = ? AND valid_until IS NULL AND revoked_at IS NULL", (site,)
        ).fetchone()

    # ------------------------------------------------------------ changes

    def add(self, site: str, public_key_pem: str | bytes) -> str:
        """Register `site`'s first key (or a new one after every key was revoked); return its key id.

        Re-adding the current key is a no-op. A site with a current key must `rotate` instead;
        a revoked key is never accepted again.
        """
        pem, kid = _normalise(site, public_key_pem)
        with self._db() as db, write_transaction(db):
            current = self._current(db, site)
            if current is not None and current[0] == kid:
                return kid
            if current is not None:
                raise TrustError(
                    f"site {site!r} is already registered with key {current[0][:16]}; "
                    f"use `plan-server sites rotate` to replace it"
                )
            self._refuse_known(db, site, kid)
            # After revocations, the new key must not vouch for sequences the old ones used.
            floor = db.execute("SELECT MAX(valid_until) FROM keys WHERE site = ?", (site,)).fetchone()[0] or 0
            db.execute("INSERT INTO keys VALUES (?, ?, ?, ?, ?, NULL, NULL, NULL)", (site, kid, pem, _now(), floor))
            self._bump(db)
        return kid

    @staticmethod
    def _bump(db: sqlite3.Connection) -> None:
        db.execute("UPDATE meta SET value = value + 1 WHERE name = 'version'")

    @staticmethod
    def _refuse_known(db: sqlite3.Connection, site: str, kid: str) -> None:
        row = db.execute(
            "SELECT revoked_at, valid_until FROM keys WHERE site = ? AND key_id = ?", (site, kid)
        ).fetchone()
        if row is not None:
            what = "was revoked" if row[0] else "was retired by a rotation"
            raise TrustError(f"key {kid[:16]} of site {site!r} {what}; a site needs a new key")

    def rotate(self, site: str, new_public_key_pem: str | bytes, *, last_sequence: int) -> str:
        """Replace `site`'s current key by a new one; return the new key id.

        last_sequence: the highest sequence of `site` the coordinator has stored (0 if none).
        The old key stays valid for sequences <= last_sequence (bundles signed before the
        rotation), the new key for sequences > last_sequence.
        """
        if not isinstance(last_sequence, int) or last_sequence < 0:
            raise TrustError(f"last_sequence must be a non-negative integer, got {last_sequence!r}")
        pem, kid = _normalise(site, new_public_key_pem)
        with self._db() as db, write_transaction(db):
            current = self._current(db, site)
            if current is None:
                raise TrustError(f"site {site!r} has no current key to rotate; use `plan-server sites add`")
            if current[0] == kid:
                raise TrustError(f"site {site!r}: the new key is the current key {kid[:16]}")
            self._refuse_known(db, site, kid)
            db.execute(
                "UPDATE keys SET valid_until = ?, retired_at = ? WHERE site = ? AND key_id = ?",
                (last_sequence, _now(), site, current[0]),
            )
            db.execute(
                "INSERT INTO keys VALUES (?, ?, ?, ?, ?, NULL, NULL, NULL)", (site, kid, pem, _now(), last_sequence)
            )
            self._bump(db)
        return kid

    def revoke(self, site: str, key_id_prefix: str | None = None) -> list[str]:
        """Revoke one key of `site` (by key id or a unique prefix of it of 8+ digits), or all of them.

        Returns the full ids of the keys revoked now. Their bundles are no longer valid anywhere.
        """
        with self._db() as db, write_transaction(db):
            rows = [r[0] for r in db.execute("SELECT key_id FROM keys WHERE site = ? AND revoked_at IS NULL", (site,))]
            if not rows:
                raise TrustError(f"site {site!r} is not registered (or every key of it is already revoked)")
            if key_id_prefix is not None:
                if len(key_id_prefix) < 8:
                    raise TrustError(f"key id {key_id_prefix!r}: give at least 8 hex digits")
                rows = [k for k in rows if k.startswith(key_id_prefix)]
                if len(rows) != 1:
                    raise TrustError(f"key id {key_id_prefix!r} matches {len(rows)} unrevoked keys of site {site!r}")
            now = _now()
            db.executemany(
                "UPDATE keys SET revoked_at = ? WHERE site = ? AND key_id = ?", [(now, site, k) for k in rows]
            )
            self._bump(db)
        return rows

    # ------------------------------------------------------------ queries

    def entries(self, site: str | None = None) -> list[KeyEntry]:
        """Every key ever registered (revoked ones included), by site then age."""
        q = "SELECT * FROM keys" + (" WHERE site = ?" if site else "") + " ORDER BY site, valid_after, added_at"
        with self._db() as db:
            return [KeyEntry(*r) for r in db.execute(q, (site,) if site else ())]

    def windows(self) -> dict[str, list[dict]]:
        """site -> its unrevoked keys with their sequence windows: what verifiers check bundles against."""
        return self.snapshot()[1]

    def snapshot(self) -> tuple[int, dict[str, list[dict]]]:
        """(version, windows) read in one transaction: the content of one published trust document."""
        with self._db() as db:
            db.execute("BEGIN")
            version = db.execute("SELECT value FROM meta WHERE name = 'version'").fetchone()[0]
            rows = db.execute(
                "SELECT * FROM keys WHERE revoked_at IS NULL ORDER BY site, valid_after, added_at"
            ).fetchall()
            db.execute("COMMIT")
        out: dict[str, list[dict]] = {}
        for e in (KeyEntry(*r) for r in rows):
            out.setdefault(e.site, []).append(e.window())
        return version, out

    def keys(self, site: str) -> list[str]:
        """The PEM key(s) `site` may sign *new* bundles with: its current key; empty if none."""
        with self._db() as db:
            row = self._current(db, site)
        return [row[1]] if row else []

    def all(self) -> dict[str, list[str]]:
        """site -> current PEM key, for every site that may upload."""
        return {
            s: [w["pem"] for w in ws if w["valid_until"] is None]
            for s, ws in self.windows().items()
            if any(w["valid_until"] is None for w in ws)
        }

    def sites(self) -> list[str]:
        """Sites with a current key."""
        return sorted(self.all())
