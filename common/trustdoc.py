"""The trust store as the coordinator publishes it: a DSSE envelope signed with the coordinator's key.

Receivers verify bundles against this document, never against an unsigned key list, so a
compromised channel or a man in the middle between the exchange and a site cannot add a key.
Payload (JSON, payloadType TRUST_PAYLOAD_TYPE):

    {"federation": str, "version": int, "issued_at": ISO-8601 UTC, "expires": ISO-8601 UTC,
     "sites": {site: [{"key_id", "pem", "valid_after": int, "valid_until": int | null}, ...]}}

Revoked keys are absent; windows are bundle sequence numbers (see server.trust). Freshness in the
style of TUF's timestamp role: `version` grows with every change of the key set (server.trust),
the exchange signs a new document on every request, and it `expires` a short time later. A
receiver refuses a document for another federation, an expired one, and, with the last version
it saw (node/release/trust.py), one that is older or that differs from another document of the same
version. So a replayed document cannot bring back a revoked key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common import errors
from common.dsse import EnvelopeError, sign_envelope, verify_envelope
from common.signing import key_id

TRUST_PAYLOAD_TYPE = "application/vnd.plan-node.release.trust-store+json"
MAX_DOCUMENT_BYTES = 8 * 1024 * 1024
MAX_CLOCK_SKEW_S = 300  # between the coordinator's and a site's clock


class TrustDocumentError(ValueError):
    """The published trust store is malformed or not signed by the coordinator; the message says which."""

    exit_code = errors.VERIFY


def sign_trust_document(
    windows: dict[str, list[dict]],
    coordinator_key: Ed25519PrivateKey,
    *,
    federation: str,
    version: int,
    ttl_s: float,
    now: dt.datetime | None = None,
) -> bytes:
    """The DSSE envelope (JSON bytes) of `windows` (server.trust.TrustStore.snapshot()) at `version`,
    signed by the coordinator, valid for `ttl_s` seconds from `now`."""
    now = now or dt.datetime.now(dt.timezone.utc)
    payload = json.dumps(
        {
            "federation": federation,
            "version": version,
            "issued_at": now.isoformat(),
            "expires": (now + dt.timedelta(seconds=ttl_s)).isoformat(),
            "sites": windows,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    env = sign_envelope(payload, TRUST_PAYLOAD_TYPE, coordinator_key, key_id(coordinator_key.public_key()))
    return json.dumps(env, sort_keys=True).encode()


def sites_digest(doc: dict) -> str:
    """sha256 of the document's key set alone: two documents of one version must agree on it."""
    return hashlib.sha256(json.dumps(doc["sites"], sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def open_trust_document(
    envelope: bytes, coordinator_pub: Ed25519PublicKey, *, federation: str | None, now: dt.datetime | None = None
) -> dict:
    """The verified payload of a published trust store; TrustDocumentError otherwise.

    federation: the name this receiver joined (None: not checked, for a receiver that has none yet).
    Refuses another federation's document and one past its `expires` (or issued in the future)."""
    if len(envelope) > MAX_DOCUMENT_BYTES:
        raise TrustDocumentError(f"trust document of {len(envelope)} bytes exceeds {MAX_DOCUMENT_BYTES}")
    try:
        env = json.loads(envelope)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrustDocumentError(f"trust document is not JSON ({e})") from None
    try:
        payload = verify_envelope(env, {key_id(coordinator_pub): coordinator_pub}, payload_type=TRUST_PAYLOAD_TYPE)
    except EnvelopeError as e:
        raise TrustDocumentError(f"trust document is not signed by the coordinator's key ({e})") from None
    doc = json.loads(payload)
    sites = doc.get("sites") if isinstance(doc, dict) else None
    if not isinstance(sites, dict) or not all(
        isinstance(s, str)
        and isinstance(ws, list)
        and all(isinstance(w, dict) and isinstance(w.get("pem"), str) for w in ws)
        for s, ws in sites.items()
    ):
        raise TrustDocumentError(
            "trust document: 'sites' must map site names to lists of {pem, valid_after, valid_until}"
        )
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise TrustDocumentError(
            f"trust document: 'version' must be a positive integer, got {str(version)[:40]!r} "
            f"(a coordinator older than this site's plan-node?)"
        )
    if federation is not None and doc.get("federation") != federation:
        raise TrustDocumentError(
            f"trust document is for federation {str(doc.get('federation'))[:64]!r}, this site joined {federation!r}"
        )
    now = now or dt.datetime.now(dt.timezone.utc)
    try:
        issued, expires = (dt.datetime.fromisoformat(doc[k]) for k in ("issued_at", "expires"))
        late = (now - expires).total_seconds()
        early = (issued - now).total_seconds()
    except (KeyError, TypeError, ValueError):
        raise TrustDocumentError(
            "trust document: 'issued_at' and 'expires' must be ISO-8601 times with a zone"
        ) from None
    if late > 0:
        raise TrustDocumentError(
            f"trust document version {version} expired {late:.0f} s ago ({doc['expires']}); "
            f"a replayed old document, or check this machine's clock"
        )
    if early > MAX_CLOCK_SKEW_S:
        raise TrustDocumentError(
            f"trust document version {version} is issued {early:.0f} s in the future; check the clocks"
        )
    return doc
