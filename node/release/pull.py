"""Stage `pull`: fetch, verify and keep every bundle in the coordinator's pool; `load_pool_data`.

Writes (workspace-relative):
    pool/<bundle_id>/        a verified bundle (bag/ + attestation.dsse.json), renamed into place whole
    pool/index.json          {bundle_id: {site, sequence, route, n_samples, sha256, pulled_at}}
    pool/rejected.json       {bundle_id: {site, reason, at}}: bundles that failed verification
    pool/trust.json          the newest trust document this site accepted (node/release/trust.py)
    pool/quarantine/<id>/    pooled bundles whose signing key is no longer trusted, out of training
    pool/quarantine.json     {bundle_id: {site, reason, at}}
Temporary files live in pool/.incoming/ and are removed. pool/.lock serialises the processes that
touch the pool: `plan-node start`'s sync (pull) and the ClientApp's rounds (load_pool_data), which
quarantine bundles that do not fit the federation.

Each bundle is checked with common.bundle.verify_bundle against the trust store the coordinator
publishes, signed with the coordinator's key (common.trustdoc; its public key came in the site
kit as keys/coordinator.pub): each site's unrevoked keys with their sequence windows.
A bundle that fails is not kept, is recorded in rejected.json and logged; it is tried again
on the next pull. The document must be no older than the last one this site accepted, and every
pull re-checks the bundles already pooled against it: a bundle whose key was revoked since (or
whose window no longer holds its sequence) moves to quarantine/ and out of training.

A pool holds one route: images (PLAN) or embeddings (CVAE) of one feature extractor. Loading
refuses a pool that mixes them, naming the bundle that does not fit.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from common.bundle import BUNDLE_ID, BundleError, load_bundle_data, recheck_signer, verify_bundle
from common.content import ContentSpec, check_admission, check_arrays
from common.fileio import atomic_write_json
from common.listing import ListingError, TrustVersionChanged
from common.signing import SigningKeyError, load_public_key
from common.tarscan import short
from common.trustdoc import TrustDocumentError
from node.release.exchange_client import ExchangeClient, ExchangeError, site_client
from node.release.trust import accept_trust_document
from node.routes import route as route_named
from node.site.workspace import Workspace

log = logging.getLogger(__name__)


@contextlib.contextmanager
def pool_lock(ws: Workspace) -> Iterator[None]:
    """Hold pool/.lock exclusively (blocking): the pool's index is read, changed and written whole
    by one process at a time."""
    ws.pool.mkdir(parents=True, exist_ok=True)
    with open(ws.pool / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_index(path: Path) -> dict:
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of bundle_id -> entry")
    return data


def _coordinator_pub(ws: Workspace):
    path = ws.resolve(ws.config().coordinator.coordinator_pub)
    try:
        return load_public_key(path)
    except SigningKeyError as e:
        raise ExchangeError(f"{e}; install the site kit with `plan-node init --kit`") from None


def trusted_document(ws: Workspace, client: ExchangeClient, coordinator_pub) -> dict:
    """The trust document the coordinator signed (common/trustdoc.py), accepted by node/release/trust.py.

    Raises ExchangeError if the document is missing, not signed by keys/coordinator.pub, for
    another federation, expired, or older than the last one this site accepted.
    """
    try:
        return accept_trust_document(ws, client.trust_document(), coordinator_pub)
    except TrustDocumentError as e:
        raise ExchangeError(f"trusted keys at {client.address}: {e}", "UNAUTHENTICATED") from None


def _signed_state(ws: Workspace, client: ExchangeClient, *, attempts: int = 3) -> tuple[dict, list[dict]]:
    """(trust windows, pool listing) that the coordinator signed under one trust document version.
    A key change between the two calls shows as another version: both are fetched again."""
    coordinator_pub = _coordinator_pub(ws)
    for attempt in range(attempts):
        doc = trusted_document(ws, client, coordinator_pub)
        try:
            listing = client.signed_list(coordinator_pub, federation=doc["federation"], trust_version=doc["version"])
            return doc["sites"], listing
        except TrustVersionChanged:
            if attempt == attempts - 1:
                raise ExchangeError(f"pool listing at {client.address}: the trust document kept changing") from None
        except ListingError as e:
            raise ExchangeError(f"pool listing at {client.address}: {e}", "UNAUTHENTICATED") from None
    raise AssertionError("unreachable")


def _pull_one(ws: Workspace, client: ExchangeClient, rec: dict, keys: dict, max_bytes: int) -> dict:
    """Download, verify and place one bundle; return its index entry. Raises on failure, leaving nothing."""
    incoming = ws.pool / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=incoming, prefix="bundle-"))
    try:
        if rec["size"] > max_bytes:
            raise BundleError(f"bundle is {rec['size']} bytes, over the limit of {max_bytes}", "too_large")
        tar = work / "bundle.tar"
        client.download(rec["bundle_id"], tar)
        vb = verify_bundle(tar, keys, max_bytes=max_bytes, dest=work / "bundle")
        if vb.bundle_id != rec["bundle_id"] or vb.site != rec["site"]:
            raise BundleError(
                f"coordinator lists it as {rec['bundle_id']} of site {rec['site']!r} but it is signed as "
                f"{vb.bundle_id} of site {vb.site!r}",
                "untrusted",
            )
        synth = ws.config().synth
        check_admission(vb, route=synth.route, extractor=synth.extractor.model_dump(mode="json"))
        final = ws.pool / vb.bundle_id
        if final.exists():  # a leftover not in the index (crash after rename): replace it
            shutil.rmtree(final)
        vb.dir.rename(final)
        return {
            "site": vb.site,
            "sequence": vb.sequence,
            "route": vb.route,
            "n_samples": vb.n_samples,
            "sha256": rec["sha256"],
            "pulled_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pull(ws: Workspace, *, client: ExchangeClient | None = None) -> list[str]:
    """Pull every pooled bundle not yet in pool/; return the ids of the newly verified ones.

    Raises ExchangeError if the coordinator cannot be reached (listing or keys).
    """
    own = client is None
    if own:
        client = site_client(ws)
    try:
        keys, listing = _signed_state(ws, client)
        with pool_lock(ws):
            return _pull_listed(ws, client, keys, listing)
    finally:
        if own:
            client.close()
        shutil.rmtree(ws.pool / ".incoming", ignore_errors=True)


def _pull_listed(ws: Workspace, client: ExchangeClient, keys: dict, listing: list[dict]) -> list[str]:
    """pull's work once the coordinator's signed state is in hand; the caller holds pool_lock."""
    max_bytes = ws.config().coordinator.max_bundle_bytes
    quarantine_untrusted(ws, keys)
    index_path, rejected_path = ws.pool / "index.json", ws.pool / "rejected.json"
    index, rejected = _read_index(index_path), _read_index(rejected_path)
    new: list[str] = []
    for rec in listing:
        bid = rec["bundle_id"]
        if not BUNDLE_ID.fullmatch(bid):  # a listing, even signed, never names a path
            log.warning("the coordinator lists a bundle id %r that is not 32 hex digits; skipped", short(bid))
            continue
        if bid in index and (ws.pool / bid).is_dir():
            continue
        try:
            index[bid] = _pull_one(ws, client, rec, keys, max_bytes)
        except (BundleError, ExchangeError) as e:
            log.warning("bundle %s of site %r rejected: %s", bid, rec["site"], e)
            rejected[bid] = {"site": rec["site"], "reason": str(e), "at": dt.datetime.now(dt.timezone.utc).isoformat()}
            atomic_write_json(rejected_path, rejected)
            continue
        rejected.pop(bid, None)
        atomic_write_json(index_path, index)  # after each bundle: a crash loses no finished work
        new.append(bid)
        log.info("pooled bundle %s of site %r (%d samples)", bid, index[bid]["site"], index[bid]["n_samples"])
    if rejected_path.exists() or rejected:
        atomic_write_json(rejected_path, rejected)
    return new


def quarantine_untrusted(ws: Workspace, keys: dict[str, list[dict]]) -> list[str]:
    """Move every pooled bundle that no key in `keys` vouches for any more to pool/quarantine/;
    return their ids."""
    moved = []
    for bid in sorted(_read_index(ws.pool / "index.json")):
        try:
            recheck_signer(ws.pool / bid, keys)
        except BundleError as e:
            quarantine(ws, bid, str(e))
            moved.append(bid)
    return moved


def quarantine(ws: Workspace, bid: str, reason: str) -> None:
    """Take pooled bundle `bid` out of training: pool/quarantine/<bid>, recorded in quarantine.json.
    The index is rewritten first, so a crash leaves no bundle half in."""
    index_path, quarantine_path = ws.pool / "index.json", ws.pool / "quarantine.json"
    index = _read_index(index_path)
    entry = index.pop(bid, {})
    records = _read_index(quarantine_path)
    records[bid] = {"site": entry.get("site"), "reason": reason, "at": dt.datetime.now(dt.timezone.utc).isoformat()}
    atomic_write_json(quarantine_path, records)
    atomic_write_json(index_path, index)
    dest = ws.pool / "quarantine" / bid
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest, ignore_errors=True)
    if (ws.pool / bid).exists():
        (ws.pool / bid).rename(dest)
    log.warning("bundle %s of site %r quarantined: %s", bid, entry.get("site"), reason)


class PoolIncomplete(BundleError):
    """A run names bundles that this site's verified pool does not hold (yet)."""

    def __init__(self, ws: Workspace, missing: Sequence[str]):
        known = {**_read_index(ws.pool / "rejected.json"), **_read_index(ws.pool / "quarantine.json")}
        why = "; ".join(f"{bid}: {known[bid]['reason'] if bid in known else 'not pulled yet'}" for bid in missing)
        super().__init__(f"{ws.pool}: the run trains on {len(missing)} bundle(s) this site has not verified: {why}")
        self.missing = list(missing)


def load_pool_data(
    ws: Workspace, *, spec: ContentSpec | None = None, route: str | None = None, bundles: Sequence[str] | None = None
) -> tuple[str | None, np.ndarray, np.ndarray]:
    """(route, data, labels int64 [N]): the verified bundles in pool/index.json, own site
    included, in bundle-id order: every one, or exactly `bundles` (a run's pool,
    common.messages.DownstreamRound.pool; PoolIncomplete names those not in the verified pool).
    route "plan": data is images uint8 [N,H,W]; "cvae": embeddings float32 [N,D].
    (None, uint8 [0,0,0], int64 [0]) when the pool is empty.

    With the federation's `spec` and `route` (a round of the federation: node/federation/rounds.py), a
    bundle that does not fit them (another route, image size or embedding length, a label outside
    the classes) is quarantined (pool/quarantine/) and the rest is loaded: one poison bundle does
    not fail every round.

    Raises BundleError naming the first bundle that does not fit the one before it: another
    route, another image size, or another embedding dimension (embeddings of different
    feature extractors are not comparable, even when their dimensions happen to agree; the
    federation pins one, docs/DESIGN.md 3.7).
    """
    with pool_lock(ws):
        index = _read_index(ws.pool / "index.json")
        if bundles is not None:
            missing = sorted(set(bundles) - set(index))
            if missing:
                raise PoolIncomplete(ws, missing)
        chosen = sorted(index if bundles is None else set(bundles))
        return _load_bundles(ws, chosen, spec=spec, expected_route=route)


def _load_bundles(
    ws: Workspace, bids: list[str], *, spec: ContentSpec | None, expected_route: str | None
) -> tuple[str | None, np.ndarray, np.ndarray]:
    """load_pool_data's work; the caller holds pool_lock."""
    route, first, parts, labels = None, None, [], []
    for bid in bids:
        r, x, y = load_bundle_data(ws.pool / bid)
        if spec is not None:
            try:
                check_arrays(r, x, y, spec, route_expected=expected_route or r, where=str(ws.pool / bid))
            except BundleError as e:
                quarantine(ws, bid, str(e))
                continue
        if route is None:
            route, first = r, bid
        elif r != route:
            raise BundleError(
                f"{ws.pool / bid}: holds {route_named(r).records} (route {r!r}) but pooled bundle {first} "
                f"holds {route_named(route).records} (route {route!r}); a pool holds one route"
            )
        elif x.shape[1:] != parts[0].shape[1:]:
            if route_named(r).records == "images":
                raise BundleError(
                    f"{ws.pool / bid}: images are {x.shape[1:]}, other pooled bundles {parts[0].shape[1:]}"
                )
            raise BundleError(
                f"{ws.pool / bid}: embeddings are {x.shape[1]}-dimensional, pooled bundle {first}'s "
                f"{parts[0].shape[1]}-dimensional (every site must embed with the same extractor)"
            )
        parts.append(x)
        labels.append(y)
    if not parts:
        return None, np.zeros((0, 0, 0), np.uint8), np.zeros((0,), np.int64)
    return route, np.concatenate(parts), np.concatenate(labels)


def load_pool(ws: Workspace) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,H,W], labels int64 [N]): every verified bundle in pool/index.json, own site
    included, in bundle-id order. Empty arrays (shape [0,0,0] and [0]) when the pool is empty.
    Raises BundleError for a pool of embeddings (use load_pool_data) or of mixed contents.
    """
    route, images, labels = load_pool_data(ws)
    if route == "cvae":
        raise BundleError(f"{ws.pool}: the pool holds embeddings (CVAE route), not images; use load_pool_data")
    return images, labels
