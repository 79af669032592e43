"""Shared pieces for the signing/bundle/exchange tests: keys, bundles, a live TLS exchange."""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.bundle import build_bundle, pack_bundle
from common.config import FederationConfig
from common.signing import generate_signing_key, load_private_key
from server.coordinator import CoordinatorDir, content_spec, init_coordinator
from server.exchange import serve
from server.store import BundleStore
from server.trust import TrustStore

# Every figure the coordinator checks against its policy floor (common/policy.py), passing the default.
PASSED_AUDIT = {
    "passed": True,
    "mia_auc": 0.52,
    "mia_auc_upper": 0.58,
    "mia_auc_two_sided_upper": 0.59,
    "reid_rate_upper": 0.04,
    "tpr_at_low_fpr_upper": 0.05,
    "closer_to_train_upper": 0.6,
    "n_degenerate": 0,
    "n_accepted": 20,
    "min_pixel_mse_to_train": 0.01,
    "policy": {"max_mia_auc": 0.65, "copy_fpr": 0.02},
}


def site_key(dir: Path, name: str):
    """(private key, public PEM text) of a fresh Ed25519 key under dir/name.{key,pub}."""
    generate_signing_key(dir / f"{name}.key", dir / f"{name}.pub")
    return load_private_key(dir / f"{name}.key"), (dir / f"{name}.pub").read_text()


def sample_set(n: int = 12, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size), dtype=np.uint8), rng.integers(0, 2, n).astype(np.int64)


def make_bundle(
    out: Path, priv, *, site: str = "a", sequence: int = 1, seed: int = 0, n: int = 12, audit: dict | None = None
) -> Path:
    """Build and pack a bundle; return the tar path."""
    images, labels = sample_set(n=n, seed=seed)
    bid = build_bundle(
        out,
        images=images,
        labels=labels,
        audit=audit or PASSED_AUDIT,
        datacard={"route": "plan"},
        site=site,
        sequence=sequence,
        signing_key=priv,
        config_digest="0" * 64,
    )
    return pack_bundle(out / bid)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveExchange:
    address: str
    ca_cert: Path
    store: BundleStore
    trust: TrustStore
    server: object
    cd: CoordinatorDir  # a real coordinator directory: CA, server certificate, coordinator key


def coordinator_dir(root: Path, *, port: int | None = None, max_bundle_bytes: int = 64 * 1024 * 1024) -> CoordinatorDir:
    """`plan-server init`'s directory (federation "test", 8x8 images) with the exchange on 127.0.0.1:port."""
    # image_size 8: the test bundles' (sample_set), which the coordinator's content check holds them to
    cfg = FederationConfig(
        name="test", exchange_port=port or free_port(), max_bundle_bytes=max_bundle_bytes, image_size=8
    )
    return init_coordinator(root, cfg)


@contextlib.contextmanager
def live_exchange(
    root: Path,
    *,
    max_bundle_bytes: int = 64 * 1024 * 1024,
    client_ca: bool = False,
    site_quota_bytes: int | None = None,
    call_timeout_s: float = 600,
    idle_timeout_s: float = 60,
    calls_per_site: int = 4,
):
    """A real exchange server with TLS (mutual with `client_ca`) on 127.0.0.1, stopped on exit."""
    cd = coordinator_dir(root, max_bundle_bytes=max_bundle_bytes)
    port = cd.config().exchange_port
    store = BundleStore(
        cd.store,
        max_bundle_bytes=max_bundle_bytes,
        site_quota_bytes=site_quota_bytes,
        content=content_spec(cd.config()),
    )
    trust = cd.trust()
    server = serve(
        store=store,
        trust=trust,
        host="127.0.0.1",
        port=port,
        cert_path=cd.tls_dir / "server.crt",
        key_path=cd.tls_dir / "server.key",
        max_bundle_bytes=max_bundle_bytes,
        client_ca_path=cd.ca_cert if client_ca else None,
        coordinator_key_path=cd.coordinator_key,
        federation="test",
        call_timeout_s=call_timeout_s,
        revoked_certs_path=cd.revoked_certs,
        idle_timeout_s=idle_timeout_s,
        calls_per_site=calls_per_site,
    )
    try:
        yield LiveExchange(f"127.0.0.1:{port}", cd.ca_cert, store, trust, server, cd)
    finally:
        server.stop(grace=None)
