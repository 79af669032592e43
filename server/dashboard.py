"""`plan-server dashboard`: the federation at a glance, read-only, in a browser.

The page (server/dashboard_page/, with common/page/'s shared script and style) polls
/api/state, which is server.dashboard_state.snapshot of the coordinator directory at that moment.
Serving and its security (loopback by default; TLS and an operator token elsewhere) are
common/webpage.py's.
"""

from __future__ import annotations

from pathlib import Path

from common.webpage import PageApp, PageServer, read_token
from server.coordinator import CoordinatorDir
from server.dashboard_state import snapshot

PAGE = Path(__file__).resolve().parent / "dashboard_page"
SHARED = Path(__file__).resolve().parent.parent / "common" / "page"


def dashboard_app(cd: CoordinatorDir, *, token: str | None = None) -> PageApp:
    files = {
        "/": PAGE / "index.html",
        "/dashboard.js": PAGE / "dashboard.js",
        "/page.js": SHARED / "page.js",
        "/style.css": SHARED / "style.css",
    }
    return PageApp(files=files, state=lambda: snapshot(cd), token=token)


def serve_dashboard(
    cd: CoordinatorDir,
    *,
    host: str = "127.0.0.1",
    port: int = 8050,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    token_file: Path | None = None,
) -> PageServer:
    """Start the dashboard in a thread; its `url` is where to open it (see common/webpage.py for
    what binding off loopback needs)."""
    cd.config()  # a missing or invalid federation.yaml is the operator's error, said before listening
    token = read_token(token_file) if token_file is not None else None
    return PageServer(dashboard_app(cd, token=token), host=host, port=port, tls_cert=tls_cert, tls_key=tls_key)
