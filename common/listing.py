"""The pool listing as the coordinator signs it: one page of List at a time.

A site decides what to download, and what the pool holds, from the listing. Unsigned, whoever
controls the exchange host could hide bundles or splice pages of another time. Each page is a DSSE
envelope signed with the coordinator's key (payloadType LISTING_PAYLOAD_TYPE):

    {"federation": str, "trust_version": int, "site": str, "page_token": str,
     "next_page_token": str, "bundles": [{"bundle_id", "site", "sequence", "sha256", "size", "n_samples"}]}

bound to the trust document's version the site just accepted (common/trustdoc.py) and to the
token the site asked for, so pages chain: each page names the token that fetched it and the one
for the next.
"""

from __future__ import annotations

import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common import errors
from common.dsse import EnvelopeError, sign_envelope, verify_envelope
from common.signing import key_id

LISTING_PAYLOAD_TYPE = "application/vnd.plan-node.pool-listing+json"
FIELDS = ("bundle_id", "site", "sequence", "sha256", "size", "n_samples")


class ListingError(ValueError):
    """A listing page is not signed by the coordinator or not the page asked for; the message says which."""

    exit_code = errors.VERIFY


class TrustVersionChanged(ListingError):
    """The page was signed under another trust document version than the receiver's: fetch both again."""


def sign_listing(
    bundles: list[dict],
    key: Ed25519PrivateKey,
    *,
    federation: str,
    trust_version: int,
    site: str,
    page_token: str,
    next_page_token: str,
) -> bytes:
    """The DSSE envelope (JSON bytes) of one List page."""
    payload = json.dumps({
        "federation": federation, "trust_version": trust_version, "site": site, "page_token": page_token,
        "next_page_token": next_page_token, "bundles": [{k: b[k] for k in FIELDS} for b in bundles],
    }, sort_keys=True, separators=(",", ":")).encode()  # fmt: skip
    return json.dumps(
        sign_envelope(payload, LISTING_PAYLOAD_TYPE, key, key_id(key.public_key())), sort_keys=True
    ).encode()


def open_listing(
    envelope: bytes,
    coordinator_pub: Ed25519PublicKey,
    *,
    federation: str,
    trust_version: int,
    site: str,
    page_token: str,
) -> tuple[list[dict], str]:
    """(bundles, next page token) of a signed page; ListingError unless it is the coordinator's
    page for this federation, trust version, site filter and page token."""
    try:
        payload = verify_envelope(
            json.loads(envelope), {key_id(coordinator_pub): coordinator_pub}, payload_type=LISTING_PAYLOAD_TYPE
        )
        page = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, EnvelopeError) as e:
        raise ListingError(f"pool listing is not signed by the coordinator's key ({e})") from None
    if not isinstance(page, dict) or not isinstance(page.get("bundles"), list):
        raise ListingError("pool listing: not an object with a 'bundles' list")
    if page.get("federation") != federation:
        raise ListingError(f"pool listing is for federation {str(page.get('federation'))[:64]!r}, not {federation!r}")
    if (page.get("site"), page.get("page_token")) != (site, page_token):
        raise ListingError("pool listing: the page is not the one asked for (site filter or page token differ)")
    if page.get("trust_version") != trust_version:
        raise TrustVersionChanged(
            f"pool listing was signed under trust version {page.get('trust_version')!r}, "
            f"the trust document this site holds is version {trust_version}"
        )
    bundles = page["bundles"]
    if not all(isinstance(b, dict) and set(b) == set(FIELDS) for b in bundles):
        raise ListingError(f"pool listing: every bundle must have exactly the fields {', '.join(FIELDS)}")
    next_token = page.get("next_page_token")
    if not isinstance(next_token, str):
        raise ListingError("pool listing: next_page_token must be a string")
    return bundles, next_token
