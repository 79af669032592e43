"""DSSE v1 envelopes (github.com/secure-systems-lab/dsse): sign and verify a typed payload.

The signature covers PAE(payloadType, payload), never the JSON envelope, so the envelope's
encoding does not matter. Signatures are Ed25519 (common.signing).
"""

from __future__ import annotations

import base64
import binascii
from typing import Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common import errors
from common.signing import sign, verify


class EnvelopeError(ValueError):
    """An envelope is malformed or no signature verifies; the message says which."""

    exit_code = errors.VERIFY


def pae(payload_type: str, payload: bytes) -> bytes:
    """Pre-Authentication Encoding: b"DSSEv1 <len type> <type> <len payload> <payload>"."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def sign_envelope(payload: bytes, payload_type: str, priv: Ed25519PrivateKey, keyid: str) -> dict:
    """A DSSE envelope holding `payload` with one signature by `priv` (named `keyid`)."""
    sig = sign(priv, pae(payload_type, payload))
    return {
        "payload": base64.b64encode(payload).decode(),
        "payloadType": payload_type,
        "signatures": [{"keyid": keyid, "sig": base64.b64encode(sig).decode()}],
    }


def _b64(value: object, field: str) -> bytes:
    if not isinstance(value, str):
        raise EnvelopeError(f"envelope field {field!r} must be a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise EnvelopeError(f"envelope field {field!r} is not valid base64") from None


def verify_envelope(env: dict, keys: Mapping[str, Ed25519PublicKey], *, payload_type: str | None = None) -> bytes:
    """The payload of `env` if at least one signature verifies against one of `keys` (keyid -> key).

    A signature's keyid is only a hint (keyids are not authenticated): every key is tried.
    Raises EnvelopeError otherwise.
    """
    if not isinstance(env, dict):
        raise EnvelopeError(f"envelope must be a JSON object, got {type(env).__name__}")
    ptype = env.get("payloadType")
    if not isinstance(ptype, str) or not ptype:
        raise EnvelopeError("envelope field 'payloadType' is missing or not a string")
    if payload_type is not None and ptype != payload_type:
        raise EnvelopeError(f"envelope payloadType is {ptype!r}, expected {payload_type!r}")
    payload = _b64(env.get("payload"), "payload")
    sigs = env.get("signatures")
    if not isinstance(sigs, list) or not sigs:
        raise EnvelopeError("envelope has no signatures")
    if not keys:
        raise EnvelopeError("no keys to verify the envelope against")
    message = pae(ptype, payload)
    for i, s in enumerate(sigs):
        if not isinstance(s, dict):
            raise EnvelopeError(f"envelope signatures[{i}] must be an object")
        sig = _b64(s.get("sig"), f"signatures[{i}].sig")
        hint = s.get("keyid")
        # The hinted key first (cheap path), then the rest: the hint is unauthenticated.
        ordered = sorted(keys.items(), key=lambda kv: kv[0] != hint)
        if any(verify(k, sig, message) for _, k in ordered):
            return payload
    raise EnvelopeError("no envelope signature verifies against the given keys")
