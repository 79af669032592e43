"""`plan-node init --kit FILE`: install a site kit (common.sitekit) into an initialised site workspace.

Checked before anything is written: the kit is for this site (kit.json and the certificate's CN),
its signing key id is this workspace's keys/signing.pub (the key the coordinator registered),
and the client certificate was issued by the kit's CA and is within its validity period.
Then keys/ (0700) receives ca.crt, client.crt, client.key (0600) and coordinator.pub at the
paths site.yaml names; site.yaml's coordinator addresses are set from the kit, and its release
policy is tightened to the federation's floor (PolicyConfig.stricter), so the site's gate never
passes a bundle the coordinator would refuse, and its synth.route, synth.extractor and
synth.cvae.federated become the federation's, as do its downstream settings (with which the site
trains its local-only yardstick before it joins).
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from common.config import DownstreamConfig, ExtractorConfig, PolicyConfig, commented_yaml
from common.fileio import atomic_write_bytes, atomic_write_text
from common.keyfile import write_private_file
from common.signing import SigningKeyError, key_id, load_public_key
from common.sitekit import KitError, read_kit
from common.tls import address_host
from node.site.workspace import Workspace


def _check_certificate(path: Path, files: dict[str, bytes], site: str) -> None:
    try:
        ca = x509.load_pem_x509_certificate(files["ca.crt"])
        cert = x509.load_pem_x509_certificate(files["client.crt"])
    except ValueError as e:
        raise KitError(f"{path}: ca.crt or client.crt is not a PEM certificate ({e})") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as e:
        raise KitError(f"{path}: client.crt was not issued by the kit's ca.crt ({type(e).__name__})") from None
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [site]:
        raise KitError(f"{path}: client.crt is for {cns!r}, not site {site!r}")
    now = dt.datetime.now(dt.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise KitError(
            f"{path}: client.crt is valid {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d}, not now"
        )


def _replace_private(path: Path, data: bytes) -> None:
    """Write a private key 0600 from the first byte; replace an older one atomically (kit renewal)."""
    if path.exists() and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.new")
    tmp.unlink(missing_ok=True)
    write_private_file(tmp, data)
    os.replace(tmp, path)


def install_kit(ws: Workspace, kit_path: Path) -> dict:
    """Install the kit at `kit_path` into `ws`; return its kit.json. KitError if it does not fit."""
    kit_path = Path(kit_path)
    meta, files = read_kit(kit_path)
    cfg = ws.config()
    if meta["site"] != cfg.name:
        raise KitError(f"{kit_path}: kit is for site {meta['site']!r}, this workspace is site {cfg.name!r}")
    try:
        own = key_id(load_public_key(ws.signing_pub))
    except SigningKeyError as e:
        raise KitError(f"{e} (run `plan-node init` first: the kit registers this site's signing key)") from None
    if meta["signing_key_id"] != own:
        raise KitError(
            f"{kit_path}: kit registers signing key {meta['signing_key_id'][:16]}, but "
            f"{ws.signing_pub} is key {own[:16]}; ask for a kit made with this key"
        )
    try:
        load_public_key(files["coordinator.pub"])
    except SigningKeyError as e:
        raise KitError(f"{kit_path}: coordinator.pub: {e}") from None
    _check_certificate(kit_path, files, cfg.name)
    for field in ("exchange", "superlink"):  # kits made before server_names was recorded are not checked
        host = address_host(meta[field])
        if "server_names" in meta and host not in meta["server_names"]:
            raise KitError(
                f"{kit_path}: the {field} address {meta[field]} is not covered by the coordinator's server "
                f"certificate ({', '.join(meta['server_names'])}); ask the operator for a kit made after "
                f"`plan-server ca init --host {host}`"
            )
    try:
        floor = PolicyConfig(**meta["policy_floor"]) if "policy_floor" in meta else None
    except ValueError as e:
        raise KitError(f"{kit_path}: kit.json policy_floor: {e}") from None
    try:
        extractor = ExtractorConfig(**(meta.get("extractor") or {}))
        if meta.get("route", "plan") not in ("plan", "cvae"):
            raise ValueError(f"route must be 'plan' or 'cvae', got {meta['route']!r}")
        federated = bool(meta.get("cvae_federated", False)) and meta.get("route") == "cvae"
    except ValueError as e:
        raise KitError(f"{kit_path}: kit.json route or extractor: {e}") from None
    try:  # kits made before the downstream settings were recorded leave downstream as it is
        downstream = DownstreamConfig(**meta["downstream"]) if "downstream" in meta else None
    except (ValueError, TypeError) as e:
        raise KitError(f"{kit_path}: kit.json downstream: {e}") from None
    schema = meta.get("schema")  # kits made before the schema was recorded leave data.* as it is
    if schema is not None:
        try:
            data = cfg.data.model_validate(
                {
                    **cfg.data.model_dump(),
                    "n_classes": schema["n_classes"],
                    "class_names": schema["class_names"],
                    "image_size": schema["image_size"],
                }
            )
        except (ValueError, KeyError, TypeError) as e:
            raise KitError(f"{kit_path}: kit.json schema: {e}") from None

    ws.keys.mkdir(mode=0o700, parents=True, exist_ok=True)
    ws.keys.chmod(0o700)
    c = cfg.coordinator
    _replace_private(ws.resolve(c.client_key), files["client.key"])
    atomic_write_bytes(ws.resolve(c.client_cert), files["client.crt"])
    atomic_write_bytes(ws.resolve(c.ca_cert), files["ca.crt"])
    atomic_write_bytes(ws.resolve(c.coordinator_pub), files["coordinator.pub"])
    c.exchange, c.superlink, c.federation = meta["exchange"], meta["superlink"], meta["federation"]
    if floor is not None:
        cfg.policy = cfg.policy.stricter(floor)
    if schema is not None:
        cfg.data = data
    if downstream is not None:
        cfg.downstream = downstream
    if "route" in meta:
        cfg.synth.route, cfg.synth.extractor = meta["route"], extractor
        cfg.synth.cvae.federated = federated
    atomic_write_text(ws.config_path, commented_yaml(cfg, title=f"plan-node site config for {cfg.name!r}"))
    return meta
