"""The federation's identities at the coordinator: the CA, the server certificate, the coordinator key.

    ca/ca.crt + ca.key                the federation CA: issues the server and every site's client certificate
    tls/server.crt + server.key       the exchange's, the Fleet gateway's and the (loopback) SuperLink's TLS certificate
    keys/coordinator.key + .pub       Ed25519: signs the trust store the exchange publishes
    clients/<site>.crt                every client certificate issued (a record; keys are never kept)

Each piece is created only when missing, so `init_authority` completes a directory made by an
older version and never replaces the CA or the coordinator key; only the server certificate (and
its TLS key) is issued again, when asked for names it does not cover.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from common.signing import generate_signing_key
from common.tls import certificate_names, issue_server_cert, make_ca

LOOPBACK_NAMES = ["localhost", "127.0.0.1", "::1"]


def init_authority(root: Path, federation: str, *, hosts: list[str] | None = None) -> list[Path]:
    """Create what is missing of the CA, server certificate and coordinator key under `root`; return
    what was made. With `hosts` that the server certificate does not cover yet, it is issued again
    for them (the CA and every key are kept): sites on other machines dial those names."""
    root = Path(root)
    made: list[Path] = []
    if not (root / "ca" / "ca.crt").exists():
        made += make_ca(root / "ca", federation)
    server_crt = root / "tls" / "server.crt"
    covered = certificate_names(server_crt.read_bytes()) if server_crt.exists() else []
    if not server_crt.exists() or any(h not in covered for h in hosts or []):
        # Loopback names always: the SuperLink listens on 127.0.0.1 behind the Fleet gateway.
        names = [*(hosts or []), *(h for h in covered if h not in (hosts or []))]
        names += [h for h in LOOPBACK_NAMES if h not in names]
        if not server_crt.exists():
            made += issue_server_cert(root / "ca", root / "tls", hosts=names)
        else:  # a new pair beside the old one, then each renamed over it
            with tempfile.TemporaryDirectory(dir=root / "tls") as tmp:
                crt, key = issue_server_cert(root / "ca", Path(tmp), hosts=names)
                os.replace(key, root / "tls" / "server.key")
                os.replace(crt, server_crt)
            made += [server_crt, root / "tls" / "server.key"]
    if not (root / "keys" / "coordinator.key").exists():
        generate_signing_key(root / "keys" / "coordinator.key", root / "keys" / "coordinator.pub")
        (root / "keys").chmod(0o700)
        made += [root / "keys" / "coordinator.key", root / "keys" / "coordinator.pub"]
    return made
