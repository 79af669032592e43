"""Flower SuperNode authentication keys: EC P-384 in OpenSSH format, as `flower-supernode` expects.

The public half is registered at the SuperLink (`flwr supernode register`); a SuperNode whose key
is not registered is refused.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.fileio import atomic_write_bytes
from common.keyfile import write_private_file


def generate_node_key(key_path: Path, pub_path: Path) -> str:
    """Create `key_path` (OpenSSH private key, 0600, never overwritten) and `pub_path`; return the public line."""
    key = ec.generate_private_key(ec.SECP384R1())
    write_private_file(
        Path(key_path),
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    atomic_write_bytes(Path(pub_path), pub + b"\n")
    return pub.decode()


def check_node_public_key(text: str, *, source: str) -> str:
    """`text` stripped, if it is one OpenSSH EC public key line; else ValueError naming `source`."""
    line = text.strip()
    try:
        key = serialization.load_ssh_public_key(line.encode())
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: not an OpenSSH public key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{source}: expected an EC (ecdsa-sha2-nistp*) key, got {type(key).__name__}")
    return line
