"""The exchange gRPC service (common/exchange.proto): upload, list, download, federation assets,
trusted keys, health.

Uploads stream into the bundle store, which verifies them before anything is kept. Refusals
carry a status code and a message naming the cause:

    INVALID_ARGUMENT     malformed stream, size or digest mismatch, bad bag or attestation, unsafe archive
    PERMISSION_DENIED    unregistered or revoked site, client certificate of another site, signature
                         not from a key of the site valid for the bundle's sequence, audit did not pass
    RESOURCE_EXHAUSTED   bigger than max_bundle_bytes (checked on the header and while streaming),
                         or over the site's quota of stored bytes
    CANCELLED            an upload or download still running after call_timeout_s (the server's
                         deadline per call, whatever deadline the client set)
    ALREADY_EXISTS       replay: bundle already stored, or sequence not above the site's last
    NOT_FOUND            no such bundle, or no such federation asset (server/assets.py)

With mutual TLS (`client_ca_path`, the default of the coordinator) a client without a certificate
of the federation CA never gets past the handshake, and an upload's claimed site (its header,
which must also be the site that signed the bundle) must be the CN of the client's certificate.
"""

from __future__ import annotations

import logging
import os
import stat
from concurrent import futures
from pathlib import Path
from typing import Callable

import grpc

from common import exchange_pb2 as pb
from common import exchange_pb2_grpc as pb_grpc
from common.bundle import BUNDLE_ID, code_version
from common.eventlog import append_event
from common.keyfile import read_private_file
from common.listing import sign_listing
from common.signing import load_private_key
from common.trustdoc import sign_trust_document
from common.wire import CHUNK_BYTES, encode_data, grpc_options, serialize
from server.assets import ASSETS_DIRNAME
from server.limits import SiteSlots, Watchdog
from server.revoked import certificate_serial, revoked_serials
from server.store import BundleRecord, BundleStore, StoreRefused
from server.trust import TrustStore
from server.upload import SHA256_HEX, UploadBody

log = logging.getLogger(__name__)

# List pages: ~150 bytes a bundle, so even the largest page stays far below the message cap.
LIST_PAGE_DEFAULT, LIST_PAGE_MAX = 500, 2000

_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "unsafe": grpc.StatusCode.INVALID_ARGUMENT,
    "untrusted": grpc.StatusCode.PERMISSION_DENIED,
    "policy": grpc.StatusCode.PERMISSION_DENIED,
    "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "replay": grpc.StatusCode.ALREADY_EXISTS,
    "content": grpc.StatusCode.INVALID_ARGUMENT,
}


def _info(rec: BundleRecord) -> pb.BundleInfo:
    return pb.BundleInfo(
        bundle_id=rec.bundle_id,
        site=rec.site,
        sequence=rec.sequence,
        sha256=rec.sha256,
        size=rec.size,
        n_samples=rec.n_samples,
        stored_at=rec.stored_at,
    )


def peer_site(context) -> str | None:
    """The CN of the client's TLS certificate (its site name), or None without one."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode("utf-8", "replace") if names else None


def peer_serial(context) -> str | None:
    """The serial (hex) of the client's TLS certificate, or None without one."""
    pems = context.auth_context().get("x509_pem_cert") or []
    return certificate_serial(pems[0]) if pems else None


class ExchangeServicer(pb_grpc.ExchangeServicer):
    """mutual_tls: the server requires client certificates, so the upload's site must be the peer's CN.
    coordinator_key: signs the published trust store (None: TrustedKeys sends no signed document);
    each document is valid for trust_ttl_s seconds. revoked_serials: () -> the client certificate
    serials refused (server/revoked.py); with mutual TLS every call is refused for a listed
    certificate and for a site whose every key is revoked (_admit).
    assets_dir: the federation assets DownloadAsset serves, `<sha256>` files (None: serves none)."""

    def __init__(
        self,
        *,
        store: BundleStore,
        trust: TrustStore,
        max_bundle_bytes: int,
        mutual_tls: bool = False,
        coordinator_key=None,
        federation: str = "federation",
        assets_dir: Path | None = None,
        call_timeout_s: float = 600,
        trust_ttl_s: float = 86400,
        revoked_serials=lambda: frozenset(),
        idle_timeout_s: float = 60,
        calls_per_site: int = 4,
        events_path: Path | None = None,
    ):
        self.events_path = Path(events_path) if events_path is not None else None
        self.revoked_serials = revoked_serials
        self.idle_timeout_s = idle_timeout_s
        self.slots = SiteSlots(calls_per_site)
        self.call_timeout_s = call_timeout_s
        self.trust_ttl_s = trust_ttl_s
        self.store = store
        self.trust = trust
        self.max_bundle_bytes = max_bundle_bytes
        self.mutual_tls = mutual_tls
        self.coordinator_key = coordinator_key
        self.federation = federation
        self.assets_dir = Path(assets_dir) if assets_dir is not None else None

    def _watch(self, context) -> Watchdog:
        """Cancel this call after call_timeout_s, or idle_timeout_s without progress (server/limits.py)."""
        return Watchdog(context, total_s=self.call_timeout_s, idle_s=self.idle_timeout_s)

    def _admit(self, context, *, upload: bool = False) -> Callable[[], None]:
        """Refuse a revoked site's call, whatever it is: its certificate is listed, or every key of
        its site is revoked; then take one of the site's call slots (server/limits.py), returning
        its release."""
        if not self.mutual_tls:
            return self.slots.take(context, context.peer(), upload=upload)  # no certificate: one client per connection
        site = peer_site(context)
        if peer_serial(context) in self.revoked_serials():
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"the client certificate of site {site!r} was revoked")
        entries = self.trust.entries(site) if site else []
        if entries and all(e.revoked_at for e in entries):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"site {site!r} was revoked: every key of it is")
        return self.slots.take(context, site, upload=upload)

    def _event(self, kind: str, **fields) -> None:
        if self.events_path is not None:
            append_event(self.events_path, kind, **fields)

    def Upload(self, request_iterator, context):
        release = self._admit(context, upload=True)
        try:
            return self._upload(request_iterator, context)
        finally:
            release()  # before the reply reaches the client: its next upload may follow at once

    def _upload(self, request_iterator, context):
        watchdog = self._watch(context)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "header":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first upload chunk must carry the header")
        h = first.header

        def refuse(code: grpc.StatusCode, message: str, reason: str) -> None:
            self._event("upload_refused", site=h.site, reason=reason, message=message)
            context.abort(code, message)

        if h.sha256:
            refuse(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the upload header carries sha256 {h.sha256!r} (upload protocol 1); this exchange speaks "
                f"protocol 2: an empty header sha256, the tar's sha256 in a trailer after the data; "
                f"update plan-node on the site",
                "invalid",
            )
        if h.size == 0:
            refuse(grpc.StatusCode.INVALID_ARGUMENT, "header size is 0", "invalid")
        if h.size > self.max_bundle_bytes:
            refuse(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"declared size {h.size} bytes exceeds the limit of {self.max_bundle_bytes} bytes",
                "too_large",
            )
        if self.mutual_tls and peer_site(context) != h.site:
            refuse(
                grpc.StatusCode.PERMISSION_DENIED,
                f"client certificate is for site {peer_site(context)!r} but the upload claims site {h.site!r}",
                "untrusted",
            )
        if not self.trust.keys(h.site):
            refuse(
                grpc.StatusCode.PERMISSION_DENIED,
                f"site {h.site!r} is not registered (or its key was revoked)",
                "untrusted",
            )
        body = UploadBody(request_iterator, declared=h.size, limit=self.max_bundle_bytes, progress=watchdog.touch)
        try:
            rec = self.store.put(body, verify=self.trust, site=h.site, size=h.size, sha256=body.sha256)
        except StoreRefused as e:
            log.warning("upload from site %r refused (%s): %s", h.site, e.reason, e)
            refuse(_CODES.get(e.reason, grpc.StatusCode.INVALID_ARGUMENT), str(e), e.reason)
        log.info(
            "stored bundle %s from site %r (sequence %d, %d samples)",
            rec.bundle_id,
            rec.site,
            rec.sequence,
            rec.n_samples,
        )
        self._event(
            "upload_accepted", site=rec.site, bundle_id=rec.bundle_id, sequence=rec.sequence, n_samples=rec.n_samples
        )
        return pb.UploadReply(bundle=_info(rec))

    def List(self, request, context):
        self._admit(context)
        if request.page_token and not BUNDLE_ID.fullmatch(request.page_token):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_token must be empty or a bundle id (32 hex digits)")
        size = min(request.page_size or LIST_PAGE_DEFAULT, LIST_PAGE_MAX)
        trust_version = self.trust.snapshot()[0]  # before the page: a key change after it shows as a newer version
        records = self.store.page(request.site or None, after=request.page_token, limit=size)
        next_token = records[-1].bundle_id if len(records) == size else ""
        signed = b""
        if self.coordinator_key is not None:
            signed = sign_listing(
                [r.as_dict() for r in records],
                self.coordinator_key,
                federation=self.federation,
                trust_version=trust_version,
                site=request.site,
                page_token=request.page_token,
                next_page_token=next_token,
            )
        return pb.ListReply(bundles=[_info(r) for r in records], next_page_token=next_token, signed_page=signed)

    def Download(self, request, context):
        self._admit(context)
        watchdog = self._watch(context)
        rec = self.store.get(request.bundle_id)
        if rec is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no bundle {request.bundle_id!r} in the store")
        yield pb.DownloadChunk(info=_info(rec))
        with self.store.open(rec.bundle_id) as f:
            for block in iter(lambda: f.read(CHUNK_BYTES), b""):
                yield encode_data(block)
                watchdog.touch()  # a reader that stalls blocks the yield (flow control): the watchdog ends it

    def DownloadAsset(self, request, context):
        self._admit(context)
        watchdog = self._watch(context)
        # Content-addressed: only names of 64 lower-case hex digits are looked up, so a request can
        # never name a path. The bytes go out as they are; the site checks them against its pin.
        if not SHA256_HEX.match(request.sha256):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"asset sha256 {request.sha256!r} is not 64 lower-case hex digits"
            )
        if self.assets_dir is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no asset {request.sha256}: this exchange serves no assets")
        try:
            fd = os.open(self.assets_dir / request.sha256, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            fd = None
        if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
            if fd is not None:
                os.close(fd)
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no asset {request.sha256} at the coordinator "
                f"(the operator adds it with `plan-server asset add FILE`)",
            )
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            log.info("serving asset %s (%d bytes) to %r", request.sha256, size, peer_site(context))
            yield pb.DownloadChunk(info=pb.BundleInfo(sha256=request.sha256, size=size))
            for block in iter(lambda: f.read(CHUNK_BYTES), b""):
                yield encode_data(block)
                watchdog.touch()

    def TrustedKeys(self, request, context):
        self._admit(context)
        signed = b""
        if self.coordinator_key is not None:
            version, windows = self.trust.snapshot()
            signed = sign_trust_document(
                windows, self.coordinator_key, federation=self.federation, version=version, ttl_s=self.trust_ttl_s
            )
        return pb.KeysReply(
            sites={s: pb.PublicKeys(pem=keys) for s, keys in self.trust.all().items()}, signed_document=signed
        )

    def Health(self, request, context):
        self._admit(context)
        return pb.HealthReply(
            status="ok", n_bundles=len(self.store.list()), n_sites=len(self.trust.sites()), version=code_version()
        )


_HANDLER_KINDS = {  # (client streams, server streams) -> how grpc wraps such a method
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_exchange_to_server(servicer: ExchangeServicer, server: grpc.Server) -> None:
    """Register `servicer` as the generated pb_grpc.add_ExchangeServicer_to_server does, every
    method as exchange.proto declares it, except that replies go through common.wire.serialize:
    the download streams send their data messages already encoded (encode_data)."""
    service = pb.DESCRIPTOR.services_by_name["Exchange"]
    handlers = {
        m.name: _HANDLER_KINDS[m.client_streaming, m.server_streaming](
            getattr(servicer, m.name),
            request_deserializer=getattr(pb, m.input_type.name).FromString,
            response_serializer=serialize,
        )
        for m in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def serve(
    *,
    store: BundleStore,
    trust: TrustStore,
    host: str,
    port: int,
    cert_path: Path,
    key_path: Path,
    max_bundle_bytes: int,
    client_ca_path: Path | None = None,
    coordinator_key_path: Path | None = None,
    federation: str = "federation",
    max_workers: int = 8,
    assets_dir: Path | None = None,
    call_timeout_s: float = 600,
    trust_ttl_s: float = 86400,
    revoked_certs_path: Path | None = None,
    idle_timeout_s: float = 60,
    calls_per_site: int = 4,
    events_path: Path | None = None,
) -> grpc.Server:
    """Start the exchange on host:port with TLS and return the running server (call .stop()).

    cert_path/key_path: the server certificate and its key (0600). With `client_ca_path`, clients
    must present a certificate issued by that CA (mutual TLS) and may upload only as the site
    their certificate names. coordinator_key_path: the coordinator's Ed25519 key (0600) that
    signs the published trust store. assets_dir: the federation assets served by sha256, by
    default `assets/` beside the store's folder (the coordinator directory's layout).
    call_timeout_s: an upload or download running longer is cancelled. trust_ttl_s: how long each
    signed trust document is valid. revoked_certs_path: the client certificates refused (server/revoked.py).
    idle_timeout_s: a call without progress for that long is cancelled; calls_per_site: the calls one
    site may have in progress at once, of them one upload (server/limits.py). events_path: where
    uploads accepted and refused are recorded (common/eventlog.py; None: nowhere).
    """
    cert = Path(cert_path).read_bytes()
    key = read_private_file(Path(key_path))
    client_ca = Path(client_ca_path).read_bytes() if client_ca_path else None
    creds = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
    # Beyond 2x the workers, calls are refused at once (RESOURCE_EXHAUSTED) rather than queued without end.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=grpc_options(),
        maximum_concurrent_rpcs=2 * max_workers,
    )
    add_exchange_to_server(
        ExchangeServicer(
            store=store,
            trust=trust,
            max_bundle_bytes=max_bundle_bytes,
            mutual_tls=client_ca is not None,
            coordinator_key=load_private_key(coordinator_key_path) if coordinator_key_path else None,
            federation=federation,
            assets_dir=assets_dir if assets_dir is not None else Path(store.root).parent / ASSETS_DIRNAME,
            call_timeout_s=call_timeout_s,
            trust_ttl_s=trust_ttl_s,
            revoked_serials=revoked_serials(revoked_certs_path) if revoked_certs_path else (lambda: frozenset()),
            idle_timeout_s=idle_timeout_s,
            calls_per_site=calls_per_site,
            events_path=events_path,
        ),
        server,
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, creds)
    except RuntimeError as e:
        raise OSError(f"exchange: cannot listen on {address} ({e})") from None
    if bound == 0:
        raise OSError(f"exchange: cannot listen on {address} (port in use?)")
    server.start()
    return server
