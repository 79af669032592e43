"""The trust store as the coordinator publishes it: a DSSE envelope signed with the coordinator's key.

Receivers verify bundles against this document, never against an unsigned key list, so a
compromised channel or a man in the middle between the exchange and a site cannot add a key.
Payload (JSON, payloadType TRUST_PAYLOAD_TYPE):

    {"federation": str, "issued_at": ISO-8601 UTC,
     "sites": {site: [{"key_id", "pem", "valid_after": int, "valid_until": int | null}, ...]}}

Revoked keys are absent; windows are bundle sequence numbers (see server.trust).
"""

from __future__ import annotations

import datetime as dt
import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.dsse import EnvelopeError, sign_envelope, verify_envelope
from common.signing import key_id

TRUST_PAYLOAD_TYPE = "application/vnd.plan-node.trust-store+json"
MAX_DOCUMENT_BYTES = 8 * 1024 * 1024


class TrustDocumentError(ValueError):
    """The published trust store is malformed or not signed by the coordinator; the message says which."""


def sign_trust_document(windows: dict[str, list[dict]], coordinator_key: Ed25519PrivateKey, *, federation: str) -> bytes:
    """The DSSE envelope (JSON bytes) of `windows` (server.trust.TrustStore.windows()) signed by the coordinator."""
    payload = json.dumps(
        {"federation": federation, "issued_at": dt.datetime.now(dt.timezone.utc).isoformat(), "sites": windows},
        sort_keys=True, separators=(",", ":"),
    ).encode()
    env = sign_envelope(payload, TRUST_PAYLOAD_TYPE, coordinator_key, key_id(coordinator_key.public_key()))
    return json.dumps(env, sort_keys=True).encode()


def open_trust_document(envelope: bytes, coordinator_pub: Ed25519PublicKey) -> dict:
    """The verified payload of a published trust store; TrustDocumentError otherwise."""
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
        isinstance(s, str) and isinstance(ws, list) and all(isinstance(w, dict) and isinstance(w.get("pem"), str) for w in ws)
        for s, ws in sites.items()
    ):
        raise TrustDocumentError("trust document: 'sites' must map site names to lists of {pem, valid_after, valid_until}")
    return doc
