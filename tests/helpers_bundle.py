"""Bundles for the bundle tests: an embedding set and its bundle, and edits of a built bundle
(repacked, and re-signed so that only the payload checks can catch the edit)."""

import base64
import json
import re
import struct

import numpy as np

from common.bundle import (
    ATTESTATION,
    PAYLOAD_TYPE,
    build_bundle,
    pack_bundle,
    write_tagmanifest,
)
from common.dsse import sign_envelope
from common.fileio import sha256_file
from common.signing import key_id
from tests.helpers_exchange import PASSED_AUDIT

MAX = 16 * 1024 * 1024


def repack(tar, edit):
    """Unpack `tar` beside itself, apply edit(bundle_dir), pack again; return the new tar."""
    d = tar.with_suffix("")
    edit(d)
    tar.unlink()
    return pack_bundle(d)


def embedding_set(n: int = 12, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.integers(0, 3, n).astype(np.int64)


def make_embedding_bundle(out, priv, *, site="a", sequence=1, seed=0, n=12, d=16, datacard=None):
    x, y = embedding_set(n=n, d=d, seed=seed)
    bid = build_bundle(
        out,
        embeddings=x,
        labels=y,
        audit=PASSED_AUDIT,
        datacard=datacard or {"route": "cvae"},
        site=site,
        sequence=sequence,
        signing_key=priv,
        config_digest="0" * 64,
    )
    return pack_bundle(out / bid)


def resign(d, priv, **predicate):
    """Make bundle folder `d` consistent again after an edit and sign it anew with `priv`: payload
    manifest, Payload-Oxum, tag manifest, the statement's subject digest (and `predicate` fields).
    Digests and signature then pass, so only the payload and route checks can catch the edit."""
    bag = d / "bag"
    files = sorted(p for p in (bag / "data").rglob("*") if p.is_file())
    (bag / "manifest-sha256.txt").write_text(
        "".join(f"{sha256_file(p)}  {p.relative_to(bag).as_posix()}\n" for p in files)
    )
    info = bag / "bag-info.txt"
    oxum = f"{sum(p.stat().st_size for p in files)}.{len(files)}"
    info.write_text(re.sub(r"(?m)^Payload-Oxum: .*$", f"Payload-Oxum: {oxum}", info.read_text()))
    statement = json.loads(base64.b64decode(json.loads((d / ATTESTATION).read_text())["payload"]))
    statement["subject"][0]["digest"]["sha256"] = write_tagmanifest(bag)
    statement["predicate"].update(predicate)
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
    (d / ATTESTATION).write_text(json.dumps(sign_envelope(payload, PAYLOAD_TYPE, priv, key_id(priv.public_key()))))


def resigned(tar, priv, edit, **predicate):
    """repack with `edit` then resign."""

    def both(d):
        edit(d)
        resign(d, priv, **predicate)

    return repack(tar, both)


def safetensors_file(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def emb_file(d):
    return d / "bag" / "data" / "embeddings.safetensors"
