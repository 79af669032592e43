"""The federation's identities at the coordinator: the CA, the server certificate, the coordinator key.

    ca/ca.crt + ca.key                the federation CA: issues the server and every site's client certificate
    tls/server.crt + server.key       the exchange's, the Fleet gateway's and the (loopback) SuperLink's TLS certificate
    keys/coordinator.key + .pub       Ed25519: signs the trust store the exchange publishes
    clients/<site>.crt                every client certificate issued (a record; keys are never kept)

Each piece is created only when missing, so `init_authority` completes a directory made by an
older version and never replaces a key.
"""

from __future__ import annotations

from pathlib import Path

from common.signing import generate_signing_key
from common.tls import issue_server_cert, make_ca


def init_authority(root: Path, federation: str, *, hosts: list[str] | None = None) -> list[Path]:
    """Create what is missing of the CA, server certificate and coordinator key under `root`; return what was made."""
    root = Path(root)
    made: list[Path] = []
    if not (root / "ca" / "ca.crt").exists():
        made += make_ca(root / "ca", federation)
    if not (root / "tls" / "server.crt").exists():
        # Loopback names always: the SuperLink listens on 127.0.0.1 behind the Fleet gateway.
        loopback = ["localhost", "127.0.0.1", "::1"]
        made += issue_server_cert(root / "ca", root / "tls", hosts=[*(hosts or []), *(h for h in loopback if h not in (hosts or []))])
    if not (root / "keys" / "coordinator.key").exists():
        generate_signing_key(root / "keys" / "coordinator.key", root / "keys" / "coordinator.pub")
        (root / "keys").chmod(0o700)
        made += [root / "keys" / "coordinator.key", root / "keys" / "coordinator.pub"]
    return made
