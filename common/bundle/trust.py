"""Whose signature a bundle carries: the DSSE statement opened against the sites' registered keys
and their sequence windows.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Mapping, Sequence

from common.bundle.format import ATTESTATION, MAX_SIGNATURES, PAYLOAD_TYPE, PREDICATE_TYPE, STATEMENT_TYPE, BundleError
from common.dsse import EnvelopeError, verify_envelope
from common.signing import SigningKeyError, key_id, load_public_key


def _key_entries(site: str, entries: Sequence) -> list[tuple[str, object, int, int | None]]:
    """(key id, public key, valid_after, valid_until) of each trusted-key entry of `site`.

    An entry is a PEM (str/bytes), an Ed25519PublicKey (valid for every sequence), or a dict
    {"pem", "valid_after", "valid_until"} as server.trust / common.trustdoc give.
    """
    out = []
    for e in entries:
        after, until, pem = 0, None, e
        if isinstance(e, Mapping):
            pem, after, until = e.get("pem"), e.get("valid_after", 0), e.get("valid_until")
            if not isinstance(after, int) or not (until is None or isinstance(until, int)):
                raise BundleError(
                    f"registered key of site {site!r}: bad validity window {after!r}..{until!r}", "untrusted"
                )
        try:
            # str keys are PEM text: encode so a key is never mistaken for a file name to read.
            k = load_public_key(pem.encode() if isinstance(pem, str) else pem)
        except SigningKeyError as err:
            raise BundleError(f"registered key of site {site!r} is unusable: {err}", "untrusted") from None
        out.append((key_id(k), k, after, until))
    return out


def _open_statement(env: dict, trusted_keys: Mapping[str, Sequence]) -> tuple[dict, str]:
    """(the verified in-toto statement, id of the key that signed it).

    Only keys of the site the statement claims, whose sequence window holds the sequence it
    claims, are tried: both claims are inside the signed payload, so once a signature verifies
    they are authentic.
    """
    if not isinstance(env, dict) or not isinstance(env.get("payload"), str):
        raise BundleError(f"{ATTESTATION}: not a DSSE envelope")
    signatures = env.get("signatures")
    if isinstance(signatures, list) and len(signatures) > MAX_SIGNATURES:
        raise BundleError(
            f"{ATTESTATION}: {len(signatures)} signatures; a bundle carries at most {MAX_SIGNATURES}", "unsafe"
        )
    # Read the claimed site and sequence from the (not yet trusted) payload only to pick keys.
    try:
        claimed = json.loads(base64.b64decode(env["payload"], validate=True))
        site = claimed["predicate"]["site"]
        sequence = claimed["predicate"]["sequence"]
    except Exception:
        raise BundleError(f"{ATTESTATION}: payload is not an in-toto statement naming a site and sequence") from None
    if not isinstance(site, str) or site not in trusted_keys or not trusted_keys[site]:
        raise BundleError(f"site {site!r} is not registered (or its keys were revoked)", "untrusted")
    if not isinstance(sequence, int) or isinstance(sequence, bool):
        raise BundleError(f"{ATTESTATION}: predicate.sequence {sequence!r} is not an integer")
    entries = _key_entries(site, trusted_keys[site])
    usable = {kid: k for kid, k, after, until in entries if after < sequence and (until is None or sequence <= until)}
    windows = ", ".join(
        f"{kid[:12]}: {after + 1}..{'' if until is None else until}" for kid, _, after, until in entries
    )
    for kid, k in usable.items():
        try:
            payload = verify_envelope(env, {kid: k}, payload_type=PAYLOAD_TYPE)
        except EnvelopeError:
            continue
        break
    else:
        raise BundleError(
            f"signature does not verify against any registered key of site {site!r} valid for sequence "
            f"{sequence} (keys and their sequence windows: {windows})",
            "untrusted",
        )
    statement = json.loads(payload)
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
        raise BundleError(f"{ATTESTATION}: statement _type is {statement.get('_type')!r}, expected {STATEMENT_TYPE!r}")
    if statement.get("predicateType") != PREDICATE_TYPE:
        raise BundleError(f"{ATTESTATION}: predicateType {statement.get('predicateType')!r} is not {PREDICATE_TYPE!r}")
    return statement, kid


def key_vouches(trusted_keys: Mapping[str, Sequence], site: str, kid: str, sequence: int) -> bool:
    """Whether key `kid` of `site` is among `trusted_keys` with a window holding `sequence`."""
    return any(
        k == kid and after < sequence and (until is None or sequence <= until)
        for k, _, after, until in _key_entries(site, trusted_keys.get(site, []))
    )


def recheck_signer(bundle_dir: Path, trusted_keys: Mapping[str, Sequence]) -> str:
    """The id of a registered key that still vouches for the verified bundle at `bundle_dir` (as
    verify_bundle placed it: bag/ and the attestation). Raises BundleError (reason "untrusted") when
    none does any more: the signer's key was revoked, or its window no longer holds the bundle's
    sequence. The payload's digests were checked when the bundle was verified; only trust changes."""
    path = Path(bundle_dir) / ATTESTATION
    try:
        env = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: unreadable ({e})") from None
    return _open_statement(env, trusted_keys)[1]
