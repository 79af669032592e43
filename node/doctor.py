"""`plan-node doctor`: what would stop this site, found before any training.

Each check is ok, warn (the site runs, but the operator should know) or fail (it would not run, or
not as the operator thinks); a failure carries the exit code of its kind (common/errors.py).
"""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import ssl
from dataclasses import asdict, dataclass

import numpy as np

from common import errors
from common.config import ConfigError
from common.keyfile import KeyFileError, read_private_file
from common.tls import address_host
from node.release.exchange_client import ExchangeError, read_client_cert
from node.site.data import DataError, load_dataset
from node.site.ingest import check_schema
from node.site.workspace import Workspace

MIN_FREE_BYTES = 2 * 1024**3  # a site's models, candidates and bundles take a few hundred MB
CERT_WARN_DAYS = 30


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "ok", "warn" or "fail"
    detail: str
    exit_code: int = 0  # for a failure: the exit code of its kind


def _ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


def _warn(name: str, detail: str) -> Check:
    return Check(name, "warn", detail)


def _fail(name: str, detail: str, code: int) -> Check:
    return Check(name, "fail", detail, code)


def check_site(ws: Workspace, *, network: bool = True, timeout_s: float = 5.0) -> list[Check]:
    """Every check, in the order an operator fixes things: config, data, keys and kit, the
    coordinator (with `network`), disk, GPU. Stops after a config failure (nothing else is known)."""
    try:
        cfg = ws.config()
    except ConfigError as e:
        return [_fail("config", str(e), errors.CONFIG)]
    checks = [_ok("config", f"{ws.config_path}: site {cfg.name!r}, route {cfg.synth.route}")]
    checks += _data(cfg)
    checks += _keys(ws)
    kit = ws.resolve(cfg.coordinator.client_cert).exists()
    if not kit:
        checks.append(
            _warn(
                "kit",
                f"no site kit installed ({ws.resolve(cfg.coordinator.client_cert)} absent): the site can "
                f"train and audit, not publish or join; run `plan-node init --site-dir {ws.root} --kit KIT`",
            )
        )
    else:
        checks.append(_certificate(ws.resolve(cfg.coordinator.client_cert)))
        if network:
            c = cfg.coordinator
            tls = (ws.resolve(c.ca_cert), ws.resolve(c.client_cert), ws.resolve(c.client_key))
            checks.append(_reach("exchange", c.exchange, tls, timeout_s=timeout_s, client_cert=True))
            checks.append(_reach("superlink", c.superlink, tls, timeout_s=timeout_s, client_cert=False))
    checks.append(_disk(ws))
    checks.append(_gpu(cfg.device))
    return checks


def _data(cfg) -> list[Check]:
    d = cfg.data
    try:
        data = load_dataset(d)
    except DataError as e:
        return [_fail("data", str(e), errors.DATA)]
    out = [_ok("data", f"{d.path or 'phantom'}: {len(data)} images, labels {sorted(set(data.labels.tolist()))}")]
    if d.n_classes is not None:
        try:
            check_schema(data.labels, d)
            out.append(_ok("schema", f"labels within the federation's {d.n_classes} classes"))
        except DataError as e:
            out.append(_fail("schema", str(e), errors.DATA))
    if len(np.unique(data.patient_ids)) == len(data):
        out.append(
            _warn(
                "patients",
                "every image has its own patient id, so splits are by image: if patients have several "
                "images, give their ids (npz `patient_ids`, a CSV manifest's third column), or a "
                "patient's images may sit in both train and holdout and the audit cannot see a leak",
            )
        )
    return out


def _keys(ws: Workspace) -> list[Check]:
    out = []
    for path in (ws.signing_key, ws.node_key):
        try:
            read_private_file(path)
        except KeyFileError as e:
            out.append(_fail("keys", str(e), errors.CONFIG))
    return out or [_ok("keys", f"{ws.signing_key.name}, {ws.node_key.name}: present, mode 600")]


def _certificate(path) -> Check:
    """The client certificate as the exchange client reads it, and a warning before it expires."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(read_client_cert(path))
    except ExchangeError as e:
        return _fail("certificate", str(e), errors.CONFIG)
    left = cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    if left.days < CERT_WARN_DAYS:
        return _warn(
            "certificate",
            f"{path}: expires in {left.days} days ({cert.not_valid_after_utc:%Y-%m-%d}); ask for a new kit",
        )
    return _ok("certificate", f"{path}: valid until {cert.not_valid_after_utc:%Y-%m-%d}")


def _reach(name: str, address: str, tls: tuple, *, timeout_s: float, client_cert: bool) -> Check:
    """A TCP connection and a TLS handshake that checks the server certificate against the
    federation CA and the name dialled (what gRPC and the SuperNode will do)."""
    host, port = address_host(address), int(address.rsplit(":", 1)[1])
    ca, crt, key = tls
    try:
        ctx = ssl.create_default_context(cafile=str(ca))
        if client_cert:
            ctx.load_cert_chain(str(crt), str(key))
        ctx.set_alpn_protocols(["h2"])
        with (
            socket.create_connection((host, port), timeout=timeout_s) as sock,
            ctx.wrap_socket(sock, server_hostname=host),
        ):
            pass
    except ssl.SSLCertVerificationError as e:
        return _fail(
            name,
            f"{address}: the server certificate does not fit ({e.verify_message}); if the name is the "
            f"problem the operator adds it with `plan-server ca init --host {host}` and sends a new kit",
            errors.CONFIG,
        )
    except (OSError, ssl.SSLError) as e:
        return _fail(
            name,
            f"{address}: not reachable ({e}); is the coordinator up, and the port open to this site?",
            errors.NETWORK,
        )
    return _ok(name, f"{address}: reachable, TLS certificate valid for {host}")


def _disk(ws: Workspace) -> Check:
    free = shutil.disk_usage(ws.root if ws.root.exists() else ws.root.parent).free
    gib = free / 1024**3
    if free < MIN_FREE_BYTES:
        return _warn("disk", f"{ws.root}: {gib:.1f} GiB free; a site needs about {MIN_FREE_BYTES / 1024**3:.0f} GiB")
    return _ok("disk", f"{ws.root}: {gib:.1f} GiB free")


def _gpu(device: str) -> Check:
    import torch

    wants = device.startswith("cuda")
    index = int(device.split(":")[1]) if ":" in device else 0
    if torch.cuda.is_available() and index < torch.cuda.device_count():
        return _ok("gpu", f"cuda:{index}: {torch.cuda.get_device_name(index)} (site.yaml device {device!r})")
    if wants:
        seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return _fail("gpu", f"site.yaml asks for device {device!r} but torch sees {seen} CUDA device(s)", errors.CONFIG)
    return _ok("gpu", "no GPU: training runs on the CPU (the cpu profile is sized for it)")


def as_dicts(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]


def exit_code(checks: list[Check]) -> int:
    """0 when nothing failed, else the code of the first failure."""
    return next((c.exit_code for c in checks if c.status == "fail"), 0)
