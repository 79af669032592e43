"""Ed25519 site signing keys: create, load, identify, sign, verify.

Private keys are PKCS8 PEM files, mode 0600 (common.keyfile); public keys are
SubjectPublicKeyInfo PEM. A key's id is the hex sha256 of its 32 raw public bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common import errors
from common.fileio import atomic_write_bytes
from common.keyfile import KeyFileError, read_private_file, write_private_file


class SigningKeyError(ValueError):
    """A key is missing, unreadable, too open, or not Ed25519; the message names the file."""

    exit_code = errors.CONFIG


def generate_signing_key(key_path: Path, pub_path: Path) -> Ed25519PublicKey:
    """Create a new Ed25519 key pair: `key_path` (PKCS8 PEM, 0600) and `pub_path` (PEM, 0644).

    Refuses to overwrite an existing private key. Returns the public key.
    """
    priv = Ed25519PrivateKey.generate()
    pem = priv.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        write_private_file(Path(key_path), pem)
    except KeyFileError as e:
        raise SigningKeyError(str(e)) from None
    pub = priv.public_key()
    atomic_write_bytes(Path(pub_path), public_pem(pub).encode())
    return pub


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load a PKCS8 PEM Ed25519 private key, refusing a file group/other can access."""
    try:
        data = read_private_file(Path(path))
    except KeyFileError as e:
        raise SigningKeyError(str(e)) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        # The message from cryptography never contains key material.
        raise SigningKeyError(f"{path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path}: expected an Ed25519 private key, got {type(key).__name__}")
    return key


def load_public_key(path_or_pem: Path | str | bytes | Ed25519PublicKey) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file path, PEM text/bytes, or a key (returned as is)."""
    if isinstance(path_or_pem, Ed25519PublicKey):
        return path_or_pem
    where = "public key PEM"
    if isinstance(path_or_pem, Path) or (isinstance(path_or_pem, str) and "-----BEGIN" not in path_or_pem):
        where = str(path_or_pem)
        try:
            data = Path(path_or_pem).read_bytes()
        except OSError as e:
            raise SigningKeyError(f"{where}: cannot read public key ({e.strerror})") from None
    else:
        data = path_or_pem.encode() if isinstance(path_or_pem, str) else bytes(path_or_pem)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise SigningKeyError(f"{where}: not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{where}: expected an Ed25519 public key, got {type(key).__name__}")
    return key


def public_pem(pub: Ed25519PublicKey) -> str:
    """SubjectPublicKeyInfo PEM text of a public key."""
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def key_id(public_key: Ed25519PublicKey) -> str:
    """Hex sha256 of the 32 raw public key bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def sign(priv: Ed25519PrivateKey, data: bytes) -> bytes:
    """64-byte Ed25519 signature of `data`."""
    return priv.sign(data)


def verify(pub: Ed25519PublicKey, sig: bytes, data: bytes) -> bool:
    """True if `sig` is a valid signature of `data` by `pub`."""
    try:
        pub.verify(sig, data)
    except InvalidSignature:
        return False
    return True
