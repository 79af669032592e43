"""The SuperLink's one door to the network: a TLS gateway that passes only registered SuperNodes' Fleet calls.

flwr 1.41 serves its Fleet, Control and Runtime APIs on one HTTPS port, and its open-source build
has no account authentication: whoever reaches that port and trusts the CA can register nodes,
list, start and stop runs, and a run's app executes at every site. So the SuperLink listens on
127.0.0.1 only (the operator's `flwr` CLI and the ServerApp reach it there), and this gateway holds
the public port. It forwards a request only when

- it is a POST to one of the Fleet operations a SuperNode needs (FLEET_OPS; never node
  registration, which is the operator's), and
- it carries a fresh signature by a SuperNode key in `allowed_keys()` (registered, not revoked),
  checked here before one byte of the body is read, so an outsider never reaches the SuperLink's
  parsers.

Everything else is refused here (403, 401 or 412). A FAB the SuperLink hands out (GetFab) leaves with
the coordinator's signature attached when the coordinator signed that FAB (common/fabsign.py);
SuperNodes run with `--trusted-entities` and refuse any other app.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import ssl
import threading
import time
from pathlib import Path
from typing import Callable

import httpx
import uvicorn
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.proto.fab_pb2 import GetFabResponse  # pylint: disable=no-name-in-module
from flwr.supercore.error.base import ApiErrorCode
from google.protobuf.message import DecodeError

from common.fileio import Reloaded

FLEET_PREFIX = "/v1/fleet/"
FLEET_OPS = frozenset({
    "activate-node", "deactivate-node", "send-node-heartbeat", "pull-messages", "push-messages",
    "get-run", "get-fab", "push-object", "pull-object", "confirm-message-received",
})  # fmt: skip
# The headers flwr 1.41's SuperNode signs every Fleet request with (NodeAuthHttpInterceptor).
PUBLIC_KEY_HEADER = "flwr-public-key"
SIGNATURE_HEADER = "flwr-signature"
TIMESTAMP_HEADER = "flwr-timestamp"
# The SuperLink's own window for the signed timestamp (flwr: TIMESTAMP_TOLERANCE, SYSTEM_TIME_TOLERANCE).
MAX_AGE_S, MAX_SKEW_S = 300.0, 5.0
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding",
    "upgrade", "host", "content-length", "content-encoding", "accept-encoding",
})  # fmt: skip


class Refused(Exception):
    """A request the gateway will not forward: the HTTP status and the reason it answers with.

    The reply is the JSON error flwr's clients print ({"code", "detail"}), so a refused SuperNode
    names the cause in its own log."""

    def __init__(self, status: int, reason: str, *, code: int = 0):
        super().__init__(reason)
        self.status = status
        self.code = code

    def body(self) -> bytes:
        return json.dumps({"code": self.code, "detail": str(self)}).encode()


def node_key_der(key: ec.EllipticCurvePublicKey) -> bytes:
    """A SuperNode key as DER SubjectPublicKeyInfo: one form for keys read as OpenSSH lines or as PEM headers."""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def authenticate(headers: dict[str, str], allowed: frozenset[bytes], *, now: float | None = None) -> bytes:
    """Check a Fleet request's SuperNode signature; return the node key (DER) or raise Refused
    (401: no or a bad signature; 412: a key this federation does not admit).

    headers: lower-case names. The signature is ECDSA-SHA256 over the ISO timestamp, as flwr signs it.
    """
    try:
        pem = base64.b64decode(headers[PUBLIC_KEY_HEADER], validate=True)
        signature = base64.b64decode(headers[SIGNATURE_HEADER], validate=True)
        stamp = headers[TIMESTAMP_HEADER]
    except (KeyError, binascii.Error):
        raise Refused(401, "no SuperNode signature: only registered SuperNodes may use this port") from None
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise Refused(401, "the SuperNode public key header is not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or node_key_der(key) not in allowed:
        # 412 with activation's error code, as the SuperLink answers an unknown key: the SuperNode
        # exits with this message (on a 401 it stops silently, as if asked to).
        raise Refused(
            412,
            "not a registered SuperNode key of this federation (unknown or revoked); "
            "ask the coordinator for a site kit",
            code=ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED,
        )
    try:
        signed_at = dt.datetime.fromisoformat(stamp).timestamp()
        key.verify(signature, stamp.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    except (ValueError, UnicodeError, InvalidSignature):
        raise Refused(401, "the SuperNode signature does not verify") from None
    age = (time.time() if now is None else now) - signed_at
    if not -MAX_SKEW_S < age < MAX_AGE_S + MAX_SKEW_S:
        raise Refused(401, f"the signed timestamp is {age:.0f} s old; check the site's clock")
    return node_key_der(key)


def sign_fab_response(body: bytes, verifications: Callable[[str], dict[str, str] | None]) -> bytes:
    """A GetFabResponse with the coordinator's signature for its FAB attached, if it signed that FAB.

    The SuperLink's own verifications are dropped: only the coordinator vouches for an app."""
    reply = GetFabResponse.FromString(body)
    reply.fab.verifications.clear()
    signed = verifications(hashlib.sha256(reply.fab.content).hexdigest())
    if signed:
        reply.fab.verifications.update(signed)
    return reply.SerializeToString()


class FleetGateway:
    """The ASGI app: checks, forwards to `upstream` (https://127.0.0.1:PORT), relays the reply."""

    def __init__(
        self,
        *,
        upstream: str,
        ca_cert: Path,
        allowed_keys: Callable[[], frozenset[bytes]],
        fab_verifications: Callable[[str], dict[str, str] | None],
        max_body_bytes: int,
        log: Callable[[str], None] = lambda _: None,
    ):
        self.upstream = upstream.rstrip("/")
        self.ca_cert = Path(ca_cert)
        self.allowed_keys = allowed_keys
        self.fab_verifications = fab_verifications
        self.max_body_bytes = max_body_bytes
        self.log = log
        self._client: httpx.AsyncClient | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            try:
                status, headers, body = await self._forward(scope, receive)
            except Refused as e:
                self.log(f"refused {scope['method']} {scope['path'][:80]!r} from {scope.get('client')}: {e}")
                status, headers, body = e.status, [(b"content-type", b"application/json")], e.body()
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [*headers, (b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                context = ssl.create_default_context(cafile=str(self.ca_cert))
                self._client = httpx.AsyncClient(verify=context, timeout=httpx.Timeout(120, connect=10))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _forward(self, scope, receive) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        path = scope["path"]
        op = path[len(FLEET_PREFIX) :] if path.startswith(FLEET_PREFIX) else None
        if scope["method"] != "POST" or op not in FLEET_OPS:
            raise Refused(403, "this port passes only SuperNodes' Fleet calls; the Control API is the operator's")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        authenticate(headers, self.allowed_keys())
        body = await _read_body(receive, self.max_body_bytes)
        forwarded = {k: v for k, v in headers.items() if k not in HOP_BY_HOP}
        forwarded["accept-encoding"] = "identity"
        try:
            reply = await self._client.post(self.upstream + path, content=body, headers=forwarded)
        except httpx.HTTPError as e:
            raise Refused(502, f"the SuperLink did not answer ({type(e).__name__})") from None
        content = reply.content
        if op == "get-fab" and reply.status_code == 200:
            try:
                content = sign_fab_response(content, self.fab_verifications)
            except DecodeError:
                raise Refused(502, "the SuperLink's GetFab reply is not a GetFabResponse") from None
        out = [
            (k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP
        ]
        return reply.status_code, out, content


async def _read_body(receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Refused(400, "the client went away mid-request")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"request body over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def node_keys(folder: Path) -> Reloaded:
    """The allowed SuperNode keys (DER): every `<site>.pub` (OpenSSH line) in `folder`, re-read
    when the folder changes. Revoking a site moves its file out (server/coordinator.py), which
    the next request sees."""
    return Reloaded(folder, _read_node_keys, empty=frozenset())


def _read_node_keys(folder: Path) -> frozenset[bytes]:
    return frozenset(
        node_key_der(serialization.load_ssh_public_key(pub.read_bytes().strip()))
        for pub in sorted(folder.glob("*.pub"))
    )


def append_line(path: Path) -> Callable[[str], None]:
    """A log function that appends a UTC-stamped line to `path` (the gateway's refusals)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        with path.open("a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {line}\n")

    return log


class GatewayServer:
    """A FleetGateway served by uvicorn (TLS) in a thread of the coordinator's process."""

    def __init__(self, app: FleetGateway, *, host: str, port: int, cert: Path, key: Path, timeout: float = 30):
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            ssl_certfile=str(cert),
            ssl_keyfile=str(key),
            lifespan="on",
            log_level="warning",
            access_log=False,
            limit_concurrency=128,
            timeout_keep_alive=30,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"fleet-gateway:{port}", daemon=True)
        self._thread.start()
        deadline = time.time() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.time() > deadline:
                raise OSError(
                    f"the Fleet gateway could not listen on {host}:{port} (port in use, or a TLS file unreadable)"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
