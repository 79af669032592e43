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
import threading
from pathlib import Path

from cryptography import x509

from common.fileio import atomic_write_json


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


class RevokedSerials:
    """The deny-list at `path` as a set of serials, re-read when the file changes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stamp: int | None = None
        self._serials: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def __call__(self) -> frozenset[str]:
        try:
            stamp = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return frozenset()
        with self._lock:
            if stamp != self._stamp:
                self._serials, self._stamp = frozenset(json.loads(self.path.read_text())), stamp
            return self._serials
