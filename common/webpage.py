"""A small read-only web page server: the coordinator's and the site's dashboards.

An ASGI app served by uvicorn (already the Fleet gateway's server) that answers GET only: the
page's own static files, and `/api/state`, the JSON a `state()` function returns at that moment.
The page polls it, so a running federation updates live without a socket held open per viewer.

Security, because the page shows a federation's state to whoever reaches it:
- it binds to loopback unless told otherwise; off loopback it needs TLS and an operator token
  (a 0600 file) and refuses to start without them;
- with a token, every request must carry it: `Authorization: Bearer <token>`, or the HttpOnly
  cookie that `/login?token=...` sets (the token is compared in constant time);
- on loopback without a token, a request whose Host header is not a loopback name is refused, so
  a web page elsewhere cannot reach it through DNS rebinding;
- every answer forbids framing and any script but the page's own (Content-Security-Policy);
- the static files come from one folder, by name from a fixed list: no path from a request
  touches the file system.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import threading
import time
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs

import uvicorn

from common.config import ConfigError
from common.keyfile import read_private_file

COOKIE = "plan_dashboard"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css"}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


def is_loopback(host: str) -> bool:
    """True for a loopback name or address ("localhost", 127.0.0.0/8, ::1)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(path: Path) -> str:
    """The operator token from a 0600 file (common.keyfile refuses one group or others can read)."""
    token = read_private_file(path).decode("utf-8", "replace").strip()
    if len(token) < 16:
        raise ConfigError(f"{path}: the dashboard token must be at least 16 characters, got {len(token)}")
    return token


class PageApp:
    """The ASGI app: `files` {url path: file} served as they are, `state()` as /api/state."""

    def __init__(
        self,
        *,
        files: dict[str, Path],
        state: Callable[[], dict],
        token: str | None = None,
        extra: dict[str, Callable[[dict], tuple[int, list[tuple[bytes, bytes]], bytes]]] | None = None,
    ):
        self.files = files
        self.state = state
        self.token = token
        # url path -> handler(query) -> (status, headers, body): e.g. the site's stored audit reports
        self.extra = extra or {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        status, headers, body = self.answer(scope)
        own = {k for k, _ in headers}  # a page's own policy (a stored report's) replaces the default
        defaults = [(k, v) for k, v in SECURITY_HEADERS if k not in own]
        await send({"type": "http.response.start", "status": status, "headers": [*defaults, *headers]})
        await send({"type": "http.response.body", "body": body})

    def answer(self, scope) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if scope["method"] not in ("GET", "HEAD"):
            return text_reply(405, "this page is read-only: GET only")
        if self.token is None:
            if not is_loopback(_host_name(headers.get("host", ""))):
                return text_reply(403, "this dashboard answers on loopback only (Host header is not a loopback name)")
        elif path == "/login":
            given = (query.get("token") or [""])[0]
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return text_reply(401, "wrong or missing token")
            cookie = f"{COOKIE}={self.token}; HttpOnly; Secure; SameSite=Strict; Path=/".encode()
            return 303, [(b"location", b"/"), (b"set-cookie", cookie)], b""
        elif not self._authorised(headers):
            return text_reply(401, "this dashboard needs the operator token: open /login?token=... or send a Bearer")
        if path == "/api/state":
            body = json.dumps(_finite(self.state()), default=str, allow_nan=False).encode()
            return 200, [(b"content-type", b"application/json")], body
        if path in self.extra:
            return self.extra[path](query)
        if path in self.files:
            file = self.files[path]
            return 200, [(b"content-type", CONTENT_TYPES[file.suffix].encode())], file.read_bytes()
        return text_reply(404, f"no page at {path[:80]!r}")

    def _authorised(self, headers: dict[str, str]) -> bool:
        given = ""
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                given = value
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())


def _finite(x):
    """x with every NaN or infinite float as None: JSON has no NaN, and a page must not choke on one."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _host_name(header: str) -> str:
    """The name in a Host header, without its port: "[::1]:8050" -> "[::1]", "a.b:80" -> "a.b"."""
    if header.startswith("["):
        return header[: header.find("]") + 1]
    return header.rsplit(":", 1)[0]


def text_reply(status: int, message: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    return status, [(b"content-type", b"text/plain; charset=utf-8")], (message + "\n").encode()


class PageServer:
    """A PageApp served by uvicorn in a thread; `url` is where to open it."""

    def __init__(
        self,
        app: PageApp,
        *,
        host: str,
        port: int,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        timeout: float = 30,
    ):
        if not is_loopback(host) and (tls_cert is None or tls_key is None or app.token is None):
            raise ConfigError(
                f"the dashboard binds to {host!r}, which is not loopback: that needs --tls-cert, --tls-key and "
                "--token-file (the operator's credential); or bind to 127.0.0.1 and reach it through an SSH tunnel"
            )
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            ssl_certfile=str(tls_cert) if tls_cert else None,
            ssl_keyfile=str(tls_key) if tls_key else None,
            lifespan="on",
            log_level="warning",
            access_log=False,
            limit_concurrency=64,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=f"dashboard:{port}", daemon=True)
        self._thread.start()
        deadline = time.time() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.time() > deadline:
                raise ConfigError(f"the dashboard cannot listen on {host}:{port} (port in use? TLS files unreadable?)")
            time.sleep(0.05)
        scheme = "https" if tls_cert else "http"
        shown = f"[{host}]" if ":" in host else host
        self.url = f"{scheme}://{shown}:{self.port}/"

    def _run(self) -> None:
        try:
            self._server.run()
        except SystemExit:  # uvicorn could not start (it logs why); __init__ raises the ConfigError
            pass

    @property
    def port(self) -> int:
        return self._server.servers[0].sockets[0].getsockname()[1]

    def wait(self) -> None:
        self._thread.join()

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
