"""`plan-server kit NAME`: issue a site's client certificate, register its keys, write its site kit.

The kit format is common.sitekit's. The client key is generated in a private temporary folder,
packed into the kit (mode 0600) and deleted: the coordinator keeps only the certificate
(clients/<site>.crt). Registering the signing key is the trust store's `add`, so making a kit
again for the same key is harmless, while a different key must go through `sites rotate`.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
from pathlib import Path

from cryptography import x509

from common.eventlog import append_event
from common.fileio import atomic_write_bytes
from common.signing import SigningKeyError, key_id, load_public_key
from common.sitekit import KIT_FORMAT, KitError, write_kit
from common.tls import address_host, issue_client_cert
from server.coordinator import CoordinatorDir
from server.revoked import certificate_serial


def _address(host: str, port: int, flag: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        raise KitError(
            f"federation.yaml listens on {host!r}, which sites cannot dial; set public_host there "
            f"(`plan-server init --host NAME`) or give {flag} host:port"
        )
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_covered(address: str, names: list[str], flag: str, cd: CoordinatorDir) -> None:
    """Refuse a kit address whose host the server certificate does not cover: the site's TLS would refuse it."""
    host = address_host(address)
    if host not in names:
        raise KitError(
            f"{flag} {address}: the server certificate covers {', '.join(names)}, not {host!r}; "
            f"run `plan-server ca init --dir {cd.root} --host {host}` first"
        )


def make_kit(
    cd: CoordinatorDir,
    site: str,
    signing_pub_pem: str,
    out: Path,
    *,
    node_key_line: str | None = None,
    exchange: str | None = None,
    superlink: str | None = None,
    days: int = 825,
) -> dict:
    """Write the kit of `site` to `out` and register its keys; return kit.json's contents."""
    out = Path(out)
    if out.exists():
        raise KitError(f"{out}: already exists; refusing to overwrite a site kit")
    fed = cd.config()
    for needed in (cd.ca_cert, cd.coordinator_pub):
        if not needed.exists():
            raise KitError(f"{needed}: missing; run `plan-server ca init --dir {cd.root}` first")
    try:
        signing_id = key_id(load_public_key(signing_pub_pem.encode()))
    except SigningKeyError as e:
        raise KitError(f"signing key of site {site!r}: {e}") from None
    meta = {
        "format": KIT_FORMAT,
        "site": site,
        "federation": fed.name,
        "exchange": exchange or _address(fed.public_host or fed.exchange_host, fed.exchange_port, "--exchange"),
        "superlink": superlink or _address(fed.public_host or fed.superlink_host, fed.superlink_port, "--superlink"),
        "signing_key_id": signing_id,
        "flower_node_key_registered": node_key_line is not None,
        # the release gate every bundle must pass here; the site's own policy becomes at least this strict
        "policy_floor": fed.policy.model_dump(mode="json"),
        # what the site must synthesize: the route, and for embeddings the one extractor everybody uses
        "route": fed.route,
        "extractor": fed.extractor.model_dump(mode="json"),
        # the data every site's records must fit: ingest refuses labels outside, the site's models get these classes
        "schema": {"n_classes": fed.n_classes, "class_names": fed.class_names, "image_size": fed.image_size},
        # CVAE route: whether the CVAE is trained across the sites (decoders averaged) before synthesis
        "cvae_federated": fed.route == "cvae" and fed.cvae_federated,
        # the downstream training: the site trains its local-only yardstick with it before joining
        "downstream": fed.downstream.model_dump(mode="json"),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        # what the server certificate covers: the site checks its addresses against it (node/release/kit.py)
        "server_names": cd.server_names(),
    }
    _check_covered(meta["exchange"], meta["server_names"], "--exchange", cd)
    _check_covered(meta["superlink"], meta["server_names"], "--superlink", cd)
    cd.trust().add(site, signing_pub_pem)  # validates the site name too, before a certificate is issued
    if node_key_line is not None:
        cd.add_node_key(site, node_key_line)
    work = Path(tempfile.mkdtemp(prefix="plan-kit-"))  # 0700
    try:
        crt, key = issue_client_cert(cd.ca_dir, work, site, days=days)
        cert_pem = crt.read_bytes()
        meta["client_cert_not_after"] = x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc.isoformat()
        write_kit(
            out,
            {
                "kit.json": (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode(),
                "ca.crt": cd.ca_cert.read_bytes(),
                "client.crt": cert_pem,
                "client.key": key.read_bytes(),
                "coordinator.pub": cd.coordinator_pub.read_bytes(),
            },
        )
        atomic_write_bytes(cd.root / "clients" / f"{site}.crt", cert_pem)
        # every certificate ever issued stays on record, so that revoking the site can list them all
        atomic_write_bytes(cd.root / "clients" / "issued" / f"{site}-{certificate_serial(cert_pem)}.crt", cert_pem)
        append_event(cd.events, "kit_issued", site=site, client_cert_not_after=meta["client_cert_not_after"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return meta
