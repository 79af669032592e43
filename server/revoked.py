"""Client certificates the exchange refuses: a revoked site's, by serial number.

    clients/revoked.json   {serial (hex): {"site", "revoked_at"}}

A site's TLS certificate outlives its keys: without this list a revoked site could still list and
download the pool. The exchange refuses a call when the peer certificate's serial is listed here,
or when every signing key of its site (the certificate's CN) is revoked (server/exchange.py), so a
revoked site is refused at once, and a site added again later with a new kit is admitted only
with its new certificate.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from cryptography import x509

from common.fileio import Reloaded, atomic_write_json


def certificate_serial(pem: bytes) -> str:
    """The serial number of a PEM certificate, as lower-case hex."""
    return format(x509.load_pem_x509_certificate(pem).serial_number, "x")


def revoke_certificates(path: Path, site: str, certificates: list[Path]) -> list[str]:
    """Add the serials of `certificates` (PEM files issued to `site`) to the deny-list at `path`;
    return those added."""
    path = Path(path)
    listed = json.loads(path.read_text()) if path.exists() else {}
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    added = []
    for cert in certificates:
        serial = certificate_serial(Path(cert).read_bytes())
        if serial not in listed:
            listed[serial] = {"site": site, "revoked_at": now}
            added.append(serial)
    atomic_write_json(path, listed)
    return added


def revoked_serials(path: Path) -> Reloaded:
    """The deny-list at `path` as a frozenset of serials, re-read when the file changes."""
    return Reloaded(path, lambda p: frozenset(json.loads(p.read_text())), empty=frozenset())
