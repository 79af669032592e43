"""The dashboards' web layer (common/webpage.py), over real HTTP: read-only, loopback by default,
a token and TLS off loopback, no DNS rebinding, no path from a request on the file system."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import pytest

from common.config import ConfigError
from common.webpage import PageApp, PageServer, read_token

TOKEN = "s3cret-operator-token-0123456789"


@pytest.fixture
def page_files(tmp_path):
    index = tmp_path / "index.html"
    index.write_text("<!doctype html><p>hello</p>")
    (tmp_path / "secret.txt").write_text("not served")
    return {"/": index}


def _get(url: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def test_loopback_page_serves_its_files_and_state_only(page_files):
    server = PageServer(PageApp(files=page_files, state=lambda: {"n": 1, "x": float("nan")}), host="127.0.0.1", port=0)
    try:
        status, body, headers = _get(server.url)
        assert status == 200 and b"hello" in body
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        status, body, _ = _get(server.url + "api/state")
        assert status == 200 and body == b'{"n": 1, "x": null}'  # NaN is no JSON: sent as null
        for path in ("secret.txt", "../secret.txt", "%2e%2e/secret.txt", "index.html/../secret.txt"):
            assert _get(server.url + path)[0] == 404, path
        # read-only
        req = urllib.request.Request(server.url + "api/state", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 405
    finally:
        server.stop()


def test_a_foreign_host_header_is_refused_on_loopback(page_files):
    """DNS rebinding: a page on evil.example whose name resolves to 127.0.0.1 must not read the state."""
    server = PageServer(PageApp(files=page_files, state=lambda: {"n": 1}), host="127.0.0.1", port=0)
    try:
        status, body, _ = _get(server.url + "api/state", {"Host": f"evil.example:{server.port}"})
        assert status == 403 and b"loopback" in body
        assert _get(server.url + "api/state", {"Host": f"localhost:{server.port}"})[0] == 200
    finally:
        server.stop()


def test_off_loopback_needs_tls_and_a_token(page_files, tmp_path):
    app = PageApp(files=page_files, state=dict)
    with pytest.raises(ConfigError, match="not loopback.*--tls-cert.*--token-file"):
        PageServer(app, host="0.0.0.0", port=0)
    token_app = PageApp(files=page_files, state=dict, token=TOKEN)
    with pytest.raises(ConfigError, match="--tls-cert"):
        PageServer(token_app, host="0.0.0.0", port=0)  # a token without TLS would cross the network in clear


def test_with_a_token_every_request_must_carry_it(page_files):
    server = PageServer(PageApp(files=page_files, state=lambda: {"n": 1}, token=TOKEN), host="127.0.0.1", port=0)
    try:
        assert _get(server.url + "api/state")[0] == 401
        assert _get(server.url + "api/state", {"Authorization": "Bearer wrong-token-wrong-token"})[0] == 401
        assert _get(server.url + "api/state", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert _get(server.url + "login?token=nope")[0] == 401
        # /login sets an HttpOnly cookie and sends the browser to the page
        status, _, headers = _get_no_redirect(server.url + f"login?token={TOKEN}")
        assert status == 303 and "HttpOnly" in headers["set-cookie"]
        cookie = headers["set-cookie"].split(";")[0]
        assert _get(server.url + "api/state", {"Cookie": cookie})[0] == 200
    finally:
        server.stop()


def _get_no_redirect(url: str) -> tuple[int, bytes, dict]:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    try:
        with urllib.request.build_opener(NoRedirect).open(url, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def test_the_token_file_must_be_private_and_long_enough(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="too open"):
        read_token(path)
    os.chmod(path, 0o600)
    assert read_token(path) == TOKEN
    short = tmp_path / "short"
    short.write_text("abc")
    os.chmod(short, 0o600)
    with pytest.raises(ConfigError, match="at least 16"):
        read_token(short)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # and the thread ends quietly
def test_a_port_in_use_is_a_clear_error(page_files):
    first = PageServer(PageApp(files=page_files, state=dict), host="127.0.0.1", port=0)
    try:
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{first.port}"):
            PageServer(PageApp(files=page_files, state=dict), host="127.0.0.1", port=first.port, timeout=5)
    finally:
        first.stop()
