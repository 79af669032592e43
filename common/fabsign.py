"""Flower App (FAB) signatures in the form a Flower 1.41 SuperNode checks with `--trusted-entities`.

A SuperNode started with `--trusted-entities FILE` runs a run's FAB only if the FAB's
`verifications` hold an Ed25519 signature, by one of the keys in FILE, over
`signed_at` (8 bytes, big-endian) + sha256(FAB), plus a non-empty `valid_license` entry.
Open-source Flower attaches verifications only to apps from its online hub, so the coordinator
signs its own FAB with its Ed25519 key and its Fleet gateway (server/fleet_gateway.py) attaches
the stored signature to the FAB as it passes to the sites. The signing key never leaves the
coordinator's own process; the gateway only relays signatures made beforehand.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

# Flower's SuperNode requires this entry to be non-empty before it looks at any signature.
LICENSE_KEY = "valid_license"


def entity_id(public_key: Ed25519PublicKey) -> str:
    """The key's id in the trusted-entities file: `fpk_` + the first 32 hex digits of sha256(raw key)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "fpk_" + hashlib.sha256(raw).hexdigest()[:32]


def trusted_entities(public_key: Ed25519PublicKey) -> dict[str, str]:
    """{entity id: OpenSSH public key line}: the contents of a SuperNode's `--trusted-entities` YAML."""
    line = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return {entity_id(public_key): line}


def signed_message(fab_sha256: bytes, signed_at: int) -> bytes:
    """What is signed: `signed_at` as 8 big-endian bytes, then the FAB's 32-byte sha256 digest."""
    return signed_at.to_bytes(8, "big") + fab_sha256


def sign_fab(fab: bytes, key: Ed25519PrivateKey, *, signed_at: int | None = None) -> dict[str, str]:
    """The FAB's `verifications` map, signed by `key`: {entity id: JSON, "valid_license": "Valid"}."""
    signed_at = int(time.time()) if signed_at is None else signed_at
    signature = key.sign(signed_message(hashlib.sha256(fab).digest(), signed_at))
    record = {"signature": base64.urlsafe_b64encode(signature).decode().rstrip("="), "signed_at": signed_at}
    return {entity_id(key.public_key()): json.dumps(record), LICENSE_KEY: "Valid"}
