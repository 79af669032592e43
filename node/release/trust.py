"""A site's memory of the coordinator's trust document: the newest version it accepted.

Reads and writes `pool/trust.json`:

    {"federation": str, "version": int, "sites_sha256": str, "expires": ISO-8601, "accepted_at": ISO-8601}

`accept_trust_document` opens a document (signature, federation, expiry: common.trustdoc) and
refuses it when its version is older than the one recorded, or equal but with another key set
(only a coordinator key that signs two histories can do that). The record is written only after
the checks pass, so a refused document changes nothing. Deleting pool/ forgets the version; the
next document is then checked for signature, federation and expiry only.
"""

from __future__ import annotations

import datetime as dt
import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.fileio import atomic_write_json
from common.trustdoc import TrustDocumentError, open_trust_document, sites_digest
from node.site.workspace import Workspace


def trust_state(ws: Workspace) -> dict:
    """The record of the last accepted trust document; {} when there is none."""
    path = ws.pool / "trust.json"
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrustDocumentError(
            f"{path}: unreadable ({e}); delete it only if you trust the coordinator's next document"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("version"), int):
        raise TrustDocumentError(f"{path}: expected a JSON object with an integer 'version'")
    return state


def accept_trust_document(
    ws: Workspace, envelope: bytes, coordinator_pub: Ed25519PublicKey, *, now: dt.datetime | None = None
) -> dict:
    """The verified document if it is at least as new as the last one this site accepted; records it.

    Raises TrustDocumentError naming the cause: signature, federation, expiry, rollback, or two
    different documents of one version."""
    state = trust_state(ws)
    federation = ws.config().coordinator.federation or state.get("federation")
    doc = open_trust_document(envelope, coordinator_pub, federation=federation, now=now)
    version, digest = doc["version"], sites_digest(doc)
    seen = state.get("version", 0)
    if version < seen:
        raise TrustDocumentError(
            f"trust document version {version} is older than version {seen}, which this site "
            f"accepted on {state.get('accepted_at')}: a rollback, refused"
        )
    if version == seen and digest != state.get("sites_sha256"):
        raise TrustDocumentError(
            f"trust document version {version} lists other keys than the version {version} this "
            f"site accepted: the coordinator's key signed two histories; tell the operator"
        )
    if version > seen or "federation" not in state:
        ws.pool.mkdir(parents=True, exist_ok=True)
        atomic_write_json(ws.pool / "trust.json", {
            "federation": doc["federation"], "version": version, "sites_sha256": digest, "expires": doc["expires"],
            "accepted_at": (now or dt.datetime.now(dt.timezone.utc)).isoformat(),
        })  # fmt: skip
    return doc
