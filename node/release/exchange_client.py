"""A node's client for the coordinator's exchange (common/exchange.proto), over TLS.

Every call raises ExchangeError carrying the server's status code and message. Downloads are
written to a temporary file beside the destination and renamed only once their size and
sha256 match what the server announced.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import grpc
from cryptography import x509

from common import errors
from common import exchange_pb2 as pb
from common import exchange_pb2_grpc as pb_grpc
from common.bundle import read_bundle_site
from common.keyfile import read_private_file
from common.listing import ListingError, open_listing
from common.wire import CHUNK_BYTES, encode_data, grpc_options, serialize


class ExchangeError(RuntimeError):
    """A call to the exchange failed. `code` is the gRPC status code name (e.g. "PERMISSION_DENIED")."""

    exit_code = errors.NETWORK

    def __init__(self, message: str, code: str = "UNKNOWN"):
        super().__init__(message)
        self.code = code


def read_client_cert(path: Path) -> bytes:
    """The PEM client certificate at `path`, refused here with a clear message if it is unreadable or
    outside its validity period (the server would only say that the TLS handshake failed)."""
    try:
        pem = path.read_bytes()
        cert = x509.load_pem_x509_certificate(pem)
    except OSError as e:
        raise ExchangeError(
            f"{path}: cannot read the site's client certificate ({e.strerror}); "
            f"install the site kit with `plan-node init --kit`"
        ) from None
    except ValueError as e:
        raise ExchangeError(f"{path}: not a PEM certificate ({e})") from None
    now = dt.datetime.now(dt.timezone.utc)
    if now > cert.not_valid_after_utc:
        raise ExchangeError(
            f"{path}: client certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
            f"ask the coordinator's operator for a new site kit",
            "CERTIFICATE_EXPIRED",
        )
    if now < cert.not_valid_before_utc:
        raise ExchangeError(f"{path}: client certificate is not valid before {cert.not_valid_before_utc.isoformat()}")
    return pem


def site_client(ws) -> "ExchangeClient":
    """The exchange client of site workspace `ws`: its CA, client certificate and key from site.yaml."""
    c = ws.config().coordinator
    return ExchangeClient(
        c.exchange,
        ws.resolve(c.ca_cert),
        timeout=c.timeout_s,
        client_cert=ws.resolve(c.client_cert),
        client_key=ws.resolve(c.client_key),
    )


# How an exchange of upload protocol 1 refuses this client's header; the hint says why.
_OLD_EXCHANGE_HINT = {
    "header sha256 '' is not 64 lower-case hex digits": (
        " (that exchange speaks upload protocol 1, the tar's sha256 in the header; this node sends it in "
        "a trailer after the data, protocol 2: update plan-node on the coordinator)"
    ),
}


def _upload_messages(tar_path: Path, site: str) -> Iterator[pb.UploadChunk | bytes]:
    """An upload (protocol 2, see exchange.proto): the header, the tar in data chunks (already
    encoded), then the trailer with the sha256 of what was sent, hashed while sending rather
    than in a pass of its own before."""
    with open(tar_path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        yield pb.UploadChunk(header=pb.UploadHeader(site=site, size=size))
        h = hashlib.sha256()
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(block)
            yield encode_data(block)
    yield pb.UploadChunk(trailer=pb.UploadTrailer(sha256=h.hexdigest()))


def _record(info: pb.BundleInfo) -> dict:
    return {
        "bundle_id": info.bundle_id,
        "site": info.site,
        "sequence": info.sequence,
        "sha256": info.sha256,
        "size": info.size,
        "n_samples": info.n_samples,
        "stored_at": info.stored_at,
    }


class ExchangeClient:
    """Talks to the exchange at `address` ("host:port"), trusting only the CA in `ca_cert_path`.

    timeout: seconds per call. client_cert/client_key: this site's certificate for mutual TLS.
    """

    def __init__(
        self,
        address: str,
        ca_cert_path: Path,
        *,
        timeout: float = 60,
        client_cert: Path | None = None,
        client_key: Path | None = None,
    ):
        try:
            ca = Path(ca_cert_path).read_bytes()
        except OSError as e:
            raise ExchangeError(f"{ca_cert_path}: cannot read the federation CA certificate ({e.strerror})") from None
        cert = read_client_cert(Path(client_cert)) if client_cert else None
        key = read_private_file(Path(client_key)) if client_key else None
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        self.address = address
        self.timeout = timeout
        self._channel = grpc.secure_channel(
            address,
            creds,
            options=grpc_options(),
        )
        self._stub = pb_grpc.ExchangeStub(self._channel)
        # The stub's Upload, but taking data messages already encoded (common.wire.encode_data).
        self._upload = self._channel.stream_unary(
            f"/{pb.DESCRIPTOR.services_by_name['Exchange'].full_name}/Upload",
            request_serializer=serialize,
            response_deserializer=pb.UploadReply.FromString,
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "ExchangeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fail(self, e: grpc.RpcError, what: str, hints: Mapping[str, str] | None = None) -> ExchangeError:
        """ExchangeError for a failed call; `hints`: text appended when the server's message starts
        with the key."""
        code = e.code().name if e.code() else "UNKNOWN"
        details = e.details() or ""
        hint = next((h for start, h in (hints or {}).items() if details.startswith(start)), "")
        if code == "UNAVAILABLE" and not hint:
            hint = _unavailable_hint(details, self.address)
        return ExchangeError(f"{what} at {self.address}: {code}: {details}{hint}", code)

    def upload(self, tar_path: Path, *, site: str | None = None) -> dict:
        """Upload a bundle tar; returns the server's record of it.

        site: the sending site, by default the one the bundle's attestation names; the server
        checks it against the signature either way.
        """
        tar_path = Path(tar_path)
        site = site or read_bundle_site(tar_path)
        try:
            reply = self._upload(_upload_messages(tar_path, site), timeout=self.timeout)
        except grpc.RpcError as e:
            raise self._fail(e, f"upload of {tar_path.name}", _OLD_EXCHANGE_HINT) from None
        return _record(reply.bundle)

    def list(self, site: str | None = None) -> list[dict]:
        """Every bundle in the coordinator's pool (only `site`'s when given), page by page, as the
        exchange states it (unsigned: for display; receivers use `signed_list`)."""
        return [_record(b) for reply in self._pages(site) for b in reply.bundles]

    def signed_list(
        self, coordinator_pub, *, federation: str, trust_version: int, site: str | None = None
    ) -> list[dict]:
        """Every bundle in the pool as the coordinator signed it, page by page (common/listing.py):
        each page verified against `coordinator_pub`, this federation, the trust document version
        the caller holds and the page token asked for. Raises ListingError (TrustVersionChanged
        when the coordinator's keys changed meanwhile: fetch the trust document again)."""
        out, token = [], ""
        for reply in self._pages(site):
            if not reply.signed_page:
                raise ListingError(
                    f"the exchange at {self.address} sent an unsigned pool listing (an older coordinator?)"
                )
            bundles, next_token = open_listing(
                reply.signed_page,
                coordinator_pub,
                federation=federation,
                trust_version=trust_version,
                site=site or "",
                page_token=token,
            )
            if next_token != reply.next_page_token:
                raise ListingError("pool listing: the signed next page token differs from the reply's")
            out += bundles
            token = next_token
        return out

    def _pages(self, site: str | None) -> Iterator[pb.ListReply]:
        token = ""
        while True:
            try:
                reply = self._stub.List(pb.ListRequest(site=site, page_token=token), timeout=self.timeout)
            except grpc.RpcError as e:
                raise self._fail(e, "list") from None
            yield reply
            if not reply.next_page_token:
                return
            if reply.next_page_token <= token:  # tokens are bundle ids in order: a loop otherwise
                raise ExchangeError(f"list at {self.address}: page tokens do not advance")
            token = reply.next_page_token

    def _stream_to(self, call, dest: Path, what: str, *, want_sha256: str | None = None, mode: int | None = None):
        """Write a streamed download (an `info` chunk, then data chunks) into a temporary file
        beside `dest` and rename it into place only when its size and sha256 are the announced
        ones (and `want_sha256`, when given); otherwise delete it and raise ExchangeError.
        `call()` starts the stream. Returns the info chunk."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            info, h, size = None, hashlib.sha256(), 0
            if mode is not None:
                os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as out:
                try:
                    for msg in call():
                        if info is None:
                            if msg.WhichOneof("kind") != "info":
                                raise ExchangeError(f"{what}: server sent data before the info")
                            info = msg.info
                            if want_sha256 is not None and info.sha256 != want_sha256:
                                raise ExchangeError(
                                    f"{what}: server announced another file, sha256 {info.sha256}", "DATA_LOSS"
                                )
                            continue
                        data = msg.data  # each access of a bytes field builds a new bytes object
                        size += len(data)
                        if size > info.size:
                            raise ExchangeError(f"{what}: more than the announced {info.size} bytes", "DATA_LOSS")
                        h.update(data)
                        out.write(data)
                except grpc.RpcError as e:
                    raise self._fail(e, what) from None
                out.flush()
                os.fsync(out.fileno())
            if info is None:
                raise ExchangeError(f"{what}: empty reply")
            got = h.hexdigest()
            if size != info.size or got != info.sha256 or (want_sha256 is not None and got != want_sha256):
                raise ExchangeError(
                    f"{what}: refused the file the coordinator at {self.address} sent for {dest}: "
                    f"{size} bytes with sha256 {got}, "
                    f"announced {info.size} bytes with sha256 {info.sha256}"
                    + (f", pinned sha256 {want_sha256}" if want_sha256 is not None else "")
                    + "; nothing was kept",
                    "DATA_LOSS",
                )
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return info

    def download(self, bundle_id: str, dest_path: Path) -> dict:
        """Download a bundle tar to `dest_path` (atomically, size and sha256 checked); returns its record."""
        info = self._stream_to(
            lambda: self._stub.Download(pb.DownloadRequest(bundle_id=bundle_id), timeout=self.timeout),
            Path(dest_path),
            f"download of {bundle_id}",
        )
        return _record(info)

    def fetch_asset(self, sha256: str, dest: Path, *, timeout: float | None = None) -> dict:
        """Download the federation asset pinned by `sha256` (64 hex digits) to `dest`: streamed into a
        temporary file beside it, renamed into place only if the bytes' sha256 is the one asked for
        (not merely the one the server announced); otherwise deleted, and ExchangeError (code
        DATA_LOSS) names the file and the digests. Returns {"sha256", "size"}.
        timeout: seconds for the whole download (default: the client's per-call timeout)."""
        dest, want = Path(dest), sha256.lower()
        info = self._stream_to(
            lambda: self._stub.DownloadAsset(pb.AssetRequest(sha256=want), timeout=timeout or self.timeout),
            dest,
            f"download of asset {want} for {dest.name}",
            want_sha256=want,
            mode=0o644,
        )
        return {"sha256": info.sha256, "size": int(info.size)}

    def trusted_keys(self) -> dict[str, list[str]]:
        """site -> current PEM keys, as the coordinator lists them: for display only (unsigned).
        Verify bundles against `trust_document()` opened with common.trustdoc instead."""
        try:
            reply = self._stub.TrustedKeys(pb.Empty(), timeout=self.timeout)
        except grpc.RpcError as e:
            raise self._fail(e, "trusted keys") from None
        return {site: list(keys.pem) for site, keys in reply.sites.items()}

    def trust_document(self) -> bytes:
        """The trust store as a DSSE envelope signed by the coordinator (common.trustdoc)."""
        try:
            reply = self._stub.TrustedKeys(pb.Empty(), timeout=self.timeout)
        except grpc.RpcError as e:
            raise self._fail(e, "trusted keys") from None
        if not reply.signed_document:
            raise ExchangeError(f"trusted keys at {self.address}: the coordinator sent no signed trust document")
        return reply.signed_document

    def health(self) -> dict:
        try:
            reply = self._stub.Health(pb.Empty(), timeout=self.timeout)
        except grpc.RpcError as e:
            raise self._fail(e, "health") from None
        return {
            "status": reply.status,
            "n_bundles": reply.n_bundles,
            "n_sites": reply.n_sites,
            "version": reply.version,
        }


def _unavailable_hint(details: str, address: str) -> str:
    """What an operator does about an exchange that cannot be reached: a TLS failure is most often
    a name the server certificate does not cover; anything else, a coordinator down or a port shut."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if any(w in details.lower() for w in ("handshake", "certificate", "peer name", "ssl")):
        return (
            f" (the TLS handshake failed: if the coordinator's certificate does not cover {host!r}, "
            f"its operator adds it with `plan-server ca init --host {host}` and sends a new kit; "
            "`plan-node doctor` checks it)"
        )
    return " (is the coordinator up and its port open to this site? `plan-node doctor` checks it)"
