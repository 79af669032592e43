"""The coordinator's bundle pool: content-addressed tars on disk plus an SQLite index.

Layout under `root`:

    objects/<sha256>.tar   every accepted bundle, named by the sha256 of its tar bytes
    incoming/              uploads being received and verified (temporary; emptied on start)
    index.db               SQLite: bundles(bundle_id PK, site, sequence, sha256, size, n_samples,
                           stored_at, key_id), and removed(...): bundles purged after their key was
                           revoked, kept so that they stay replays and sequences never go back

An upload is verified while it arrives: each chunk is counted against the limits, then hashed and
appended to a file in incoming/ by a writer thread while `verify_bundle_stream` reads the tar's
members from the chunks in memory and checks them without extracting anything (the store keeps
the tar, not the files: writing the payload's files only to delete them doubled the bytes
written, the upload's largest cost). Once the stream has ended, the file is fsynced and its
declared size and digest checked, then the replay check; only then is it renamed into objects/
and indexed, in one transaction. On any failure the temporary file (and any spill file of the
verification) is removed and the index is unchanged, so the store never holds a partial or
unverified bundle.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sqlite3
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Mapping, Sequence

from common.bundle import BundleError, VerifiedBundle, key_vouches, verify_bundle_stream
from common.config import PolicyConfig
from common.content import ContentSpec, check_admission, check_bundle_content
from common.policy import check_audit
from server.transaction import write_transaction
from server.trust import TrustStore
from server.upload import Arriving, StoreRefused

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bundles (
    bundle_id TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    sha256 TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    n_samples INTEGER NOT NULL,
    stored_at REAL NOT NULL,
    key_id TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS bundles_site ON bundles (site, sequence);
CREATE TABLE IF NOT EXISTS removed (
    bundle_id TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    key_id TEXT NOT NULL,
    removed_at REAL NOT NULL,
    reason TEXT NOT NULL
);
"""
_BLOCK = 1 << 20
# Explicit column order: an index migrated with ALTER TABLE has the same columns in this order anyway.
_COLUMNS = "bundle_id, site, sequence, sha256, size, n_samples, stored_at, key_id"


@dataclass(frozen=True)
class BundleRecord:
    bundle_id: str
    site: str
    sequence: int
    sha256: str
    size: int  # bytes of the tar
    n_samples: int
    stored_at: float  # seconds since the epoch
    key_id: str = ""  # the site key that signed it ("" for bundles stored before keys were recorded)

    def as_dict(self) -> dict:
        return asdict(self)


class BundleStore:
    """Verified bundles under `root`; uploads over `max_bundle_bytes` bytes are refused, and, with
    a `policy` (the federation's floor), bundles whose signed audit figures fail it; with a
    `route`, bundles of the other route; with an `extractor` (the federation's pinned
    ExtractorConfig as a dict), embedding bundles whose signed data card names another; with a
    `site_quota_bytes`, a bundle that would take its site's stored bytes above the quota."""

    def __init__(
        self,
        root: Path,
        *,
        max_bundle_bytes: int = 512 * 1024 * 1024,
        policy: PolicyConfig | None = None,
        route: str | None = None,
        extractor: dict | None = None,
        site_quota_bytes: int | None = None,
        content: ContentSpec | None = None,
        serving: bool = False,
    ):
        self.root = Path(root)
        self.max_bundle_bytes = max_bundle_bytes
        self.policy = policy
        self.route, self.extractor = route, extractor
        self.site_quota_bytes = site_quota_bytes
        self.content = content
        self.objects = self.root / "objects"
        self.incoming = self.root / "incoming"
        self.index_path = self.root / "index.db"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            columns = {r[1] for r in db.execute("PRAGMA table_info(bundles)")}
            if columns and "key_id" not in columns:  # an index written before signers were recorded
                db.execute("ALTER TABLE bundles ADD COLUMN key_id TEXT NOT NULL DEFAULT ''")
            db.executescript(_SCHEMA)
        # Only the serving process clears a crash's leftovers, under an exclusive lock it holds for
        # its life: `plan-server status` or `sites revoke` beside a running exchange must never
        # delete an upload in flight or an object not yet indexed.
        self._serving_fd = _serving_lock(self.root) if serving else None
        if serving:
            self._recover()

    def close(self) -> None:
        """Release the serving lock, if this store holds it."""
        if self._serving_fd is not None:
            os.close(self._serving_fd)
            self._serving_fd = None

    @contextlib.contextmanager
    def write_lock(self) -> Iterator[None]:
        """Hold the index's write lock: no bundle is inserted meanwhile (server/cli_keys.py holds it
        across reading a site's last sequence and rotating its key)."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield
            finally:
                db.execute("ROLLBACK")

    # ------------------------------------------------------------ internals

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.index_path, timeout=30, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    def _recover(self) -> None:
        """Remove what a crash may have left: temporary uploads and objects never indexed. Only
        under the serving lock (__init__)."""
        for p in self.incoming.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        with self._db() as db:
            indexed = {r[0] for r in db.execute("SELECT sha256 FROM bundles")}
        for p in self.objects.glob("*.tar"):
            if p.stem not in indexed:
                p.unlink()

    def _chunks(self, source, stack: contextlib.ExitStack) -> Iterator[bytes]:
        """`source` (path, bytes, binary file or iterable of byte chunks) as byte chunks."""
        if isinstance(source, (str, Path)):
            f = stack.enter_context(open(source, "rb"))
            return iter(lambda: f.read(_BLOCK), b"")
        if isinstance(source, (bytes, bytearray, memoryview)):
            return iter([bytes(source)])
        if hasattr(source, "read"):
            return iter(lambda: source.read(_BLOCK), b"")
        return iter(source)

    # ------------------------------------------------------------ public

    def put(
        self,
        source: Path | bytes | BinaryIO | Iterable[bytes],
        *,
        verify: TrustStore | Mapping[str, Sequence],
        site: str | None = None,
        size: int | None = None,
        sha256: str | None = None,
    ) -> BundleRecord:
        """Receive, verify and store one bundle tar; return its record or raise StoreRefused.

        verify: the trust store (or site -> public keys) the bundle's signature must verify
        against. `site`, `size`, `sha256`: what the sender declared; each, when given, must
        match what arrived (site: the site that signed the bundle). `sha256` may be a function
        returning it, called once `source` is exhausted (an upload's trailer). A source that
        breaks a limit is refused before the bytes past it are written: over the store's limit
        ("too_large"), more or fewer bytes than `size` ("invalid").
        """
        trusted = verify.windows() if isinstance(verify, TrustStore) else dict(verify)
        if size is not None and size > self.max_bundle_bytes:
            raise StoreRefused(
                f"declared size {size} bytes exceeds the limit of {self.max_bundle_bytes} bytes", "too_large"
            )
        fd, tmp_name = tempfile.mkstemp(dir=self.incoming, prefix="upload-", suffix=".tar")
        tmp = Path(tmp_name)
        work = Path(tempfile.mkdtemp(dir=self.incoming, prefix="verify-"))
        try:
            with contextlib.ExitStack() as stack:
                stack.callback(os.close, fd)
                arriving = Arriving(
                    self._chunks(source, stack), fd, name=tmp.name, limit=self.max_bundle_bytes, declared=size
                )
                stack.callback(arriving.close)  # before os.close(fd): the writer stops first
                try:
                    vb = verify_bundle_stream(arriving, trusted, max_bytes=self.max_bundle_bytes, spill_dir=work)
                except BundleError as e:
                    raise StoreRefused(str(e), e.reason) from None
                got_size, got_sha = arriving.finish()
            want_sha = sha256() if callable(sha256) else sha256
            if want_sha is not None and got_sha != want_sha:
                raise StoreRefused(f"sha256 of the received bytes is {got_sha}, declared {want_sha}", "invalid")
            if site is not None and vb.site != site:
                raise StoreRefused(
                    f"bundle is signed for site {vb.site!r} but was uploaded as site {site!r}", "untrusted"
                )
            self._admit(vb, tmp)
            with self._db() as db:
                # BEGIN IMMEDIATE takes the write lock: replay check and insert are one step,
                # across threads and processes.
                db.execute("BEGIN IMMEDIATE")
                try:
                    self._refuse_if_known(db, vb, sha256=got_sha, size=got_size, verify=verify)
                    record = BundleRecord(
                        vb.bundle_id, vb.site, vb.sequence, got_sha, got_size, vb.n_samples, time.time(), vb.key_id
                    )
                    obj = self.objects / f"{got_sha}.tar"
                    os.replace(tmp, obj)
                    try:
                        db.execute(
                            "INSERT INTO bundles "
                            "(bundle_id, site, sequence, sha256, size, n_samples, stored_at, key_id) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            tuple(asdict(record).values()),
                        )
                        db.execute("COMMIT")
                    except BaseException:
                        obj.unlink(missing_ok=True)
                        raise
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            return record
        finally:
            tmp.unlink(missing_ok=True)
            shutil.rmtree(work, ignore_errors=True)

    def _admit(self, vb: VerifiedBundle, tar: Path) -> None:
        """The federation's admission rules for a verified bundle `vb` (its tar at `tar`): route and
        extractor, the content schema, the policy floor on the audit it signed. StoreRefused if not."""
        try:
            check_admission(vb, route=self.route, extractor=self.extractor)
        except BundleError as e:
            raise StoreRefused(str(e), e.reason) from None
        if self.content is not None:
            try:
                check_bundle_content(tar, self.content, route=vb.route, embedding_dim=vb.datacard.get("embedding_dim"))
            except BundleError as e:
                raise StoreRefused(str(e), e.reason) from None
        if self.policy is not None:
            # the site's own gate ran under the site's policy; the floor is checked here, on
            # the figures the site signed (common.policy, the same function as the site's gate)
            failures = check_audit(vb.predicate.get("audit"), self.policy)
            if failures:
                raise StoreRefused("signed audit fails the federation policy: " + "; ".join(failures), "policy")

    def _refuse_if_known(
        self, db: sqlite3.Connection, vb: VerifiedBundle, *, sha256: str, size: int, verify: TrustStore | Mapping
    ) -> None:
        """Inside the insert's write transaction: StoreRefused for a replay (bundle id, digest, a
        removed bundle, a sequence not above the site's last), a site over its quota, or a key that
        stopped vouching for the bundle while it arrived."""
        if db.execute("SELECT 1 FROM bundles WHERE bundle_id = ?", (vb.bundle_id,)).fetchone():
            raise StoreRefused(f"bundle {vb.bundle_id} is already stored (replay)", "replay")
        if db.execute("SELECT 1 FROM bundles WHERE sha256 = ?", (sha256,)).fetchone():
            raise StoreRefused(f"a bundle with sha256 {sha256} is already stored (replay)", "replay")
        if db.execute("SELECT 1 FROM removed WHERE bundle_id = ? OR sha256 = ?", (vb.bundle_id, sha256)).fetchone():
            raise StoreRefused(f"bundle {vb.bundle_id} was removed from the pool (replay)", "replay")
        if self.site_quota_bytes is not None:
            # in the same write transaction as the insert: concurrent uploads of one
            # site cannot each see room that only one of them has
            used = db.execute("SELECT COALESCE(SUM(size), 0) FROM bundles WHERE site = ?", (vb.site,)).fetchone()[0]
            if used + size > self.site_quota_bytes:
                raise StoreRefused(
                    f"site {vb.site!r} stores {used} bytes; "
                    f"this bundle's {size} would exceed its quota of {self.site_quota_bytes} bytes",
                    "too_large",
                )
        if isinstance(verify, TrustStore) and not key_vouches(verify.windows(), vb.site, vb.key_id, vb.sequence):
            # re-read under the index's write lock: a revocation or rotation committed
            # while the bundle was arriving refuses it here, and one committed after
            # this point removes it (it waits for this transaction: server/cli_keys.py)
            raise StoreRefused(
                f"the key {vb.key_id[:16]} of site {vb.site!r} no longer vouches for sequence "
                f"{vb.sequence}: revoked or rotated while the bundle was arriving",
                "untrusted",
            )
        last = self._last_sequence(db, vb.site)
        if last is not None and vb.sequence <= last:
            raise StoreRefused(
                f"sequence {vb.sequence} of site {vb.site!r} is not above its last stored sequence {last} (replay)",
                "replay",
            )

    @staticmethod
    def _last_sequence(db: sqlite3.Connection, site: str) -> int | None:
        """The highest sequence of `site` ever stored, removed bundles included."""
        row = db.execute(
            "SELECT MAX(s) FROM (SELECT MAX(sequence) AS s FROM bundles WHERE site = ?"
            " UNION ALL SELECT MAX(sequence) FROM removed WHERE site = ?)",
            (site, site),
        ).fetchone()
        return row[0]

    def last_sequence(self, site: str) -> int:
        """The highest sequence of `site` the store has ever accepted; 0 if none (for key rotation)."""
        with self._db() as db:
            return self._last_sequence(db, site) or 0

    def remove_signed_by(self, site: str, key_ids: Sequence[str], *, reason: str) -> list[BundleRecord]:
        """Take every bundle of `site` signed by one of `key_ids` out of the pool; return their records.

        Bundles stored before signers were recorded (key_id "") are removed too: they may have
        been signed by a revoked key. Index rows go first, in one transaction (remembered in
        `removed`, so they stay replays); then the objects, and a crash between the two leaves
        orphan objects that the next start removes.
        """
        keys = [*key_ids, ""]
        marks = ",".join("?" * len(keys))
        with self._db() as db, write_transaction(db):
            gone = [
                BundleRecord(*r)
                for r in db.execute(
                    f"SELECT {_COLUMNS} FROM bundles WHERE site = ? AND key_id IN ({marks})", (site, *keys)
                )
            ]
            now = time.time()
            for r in gone:
                db.execute(
                    "INSERT OR REPLACE INTO removed VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (r.bundle_id, r.site, r.sequence, r.sha256, r.key_id, now, reason),
                )
                db.execute("DELETE FROM bundles WHERE bundle_id = ?", (r.bundle_id,))
        for r in gone:
            (self.objects / f"{r.sha256}.tar").unlink(missing_ok=True)
        return gone

    def list(self, site: str | None = None) -> list[BundleRecord]:
        """Stored bundles, oldest first; only `site`'s when given."""
        q = (
            f"SELECT {_COLUMNS} FROM bundles"
            + (" WHERE site = ?" if site else "")
            + " ORDER BY stored_at, site, sequence"
        )
        with self._db() as db:
            return [BundleRecord(*r) for r in db.execute(q, (site,) if site else ())]

    def page(self, site: str | None, *, after: str, limit: int) -> list[BundleRecord]:
        """At most `limit` stored bundles with a bundle id above `after` ("" from the start), in
        bundle-id order; only `site`'s when given. Stable while bundles come and go: a page token
        is the last id of the page before."""
        q = (
            f"SELECT {_COLUMNS} FROM bundles WHERE bundle_id > ?"
            + (" AND site = ?" if site else "")
            + " ORDER BY bundle_id LIMIT ?"
        )
        with self._db() as db:
            return [BundleRecord(*r) for r in db.execute(q, (after, site, limit) if site else (after, limit))]

    def get(self, bundle_id: str) -> BundleRecord | None:
        with self._db() as db:
            r = db.execute(f"SELECT {_COLUMNS} FROM bundles WHERE bundle_id = ?", (bundle_id,)).fetchone()
        return BundleRecord(*r) if r else None

    def open(self, bundle_id: str) -> BinaryIO:
        """The stored tar of `bundle_id`, opened for reading; KeyError if unknown."""
        rec = self.get(bundle_id)
        if rec is None:
            raise KeyError(f"no bundle {bundle_id!r} in the store")
        return open(self.objects / f"{rec.sha256}.tar", "rb")

    def sites_with_bundles(self) -> set[str]:
        with self._db() as db:
            return {r[0] for r in db.execute("SELECT DISTINCT site FROM bundles")}


def _serving_lock(root: Path) -> int:
    """An exclusive lock on `root`/.serving.lock for this process (its file descriptor); OSError
    when another process holds it."""
    fd = os.open(root / ".serving.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OSError(
            f"{root}: another process serves this bundle store (a running `plan-server start` "
            f"or exchange); stop it first"
        ) from None
    return fd
