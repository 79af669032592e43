"""The Fleet gateway's checks and the coordinator's FAB signatures, without processes.

The gateway's refusals happen before it opens a connection to the SuperLink, so they are
exercised here through httpx's ASGI transport; forwarding to a real SuperLink and the SuperNode's
check of a signed app are in tests/test_control_plane.py."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import os
import time

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.proto.fab_pb2 import Fab as FabProto  # pylint: disable=no-name-in-module
from flwr.proto.fab_pb2 import GetFabResponse
from flwr.supercore.fab import Fab
from flwr.supernode.start_client_internal import _verify_fab

from common.fabsign import sign_fab, trusted_entities
from server.fleet_gateway import FleetGateway, Refused, authenticate, node_key_der, node_keys, sign_fab_response


def _signed_headers(key: ec.EllipticCurvePrivateKey, *, at: dt.datetime | None = None) -> dict[str, str]:
    """What flwr 1.41's SuperNode attaches to every Fleet request."""
    stamp = (at or dt.datetime.now(dt.timezone.utc)).isoformat()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return {
        "flwr-public-key": base64.b64encode(pem).decode(),
        "flwr-signature": base64.b64encode(key.sign(stamp.encode(), ec.ECDSA(hashes.SHA256()))).decode(),
        "flwr-timestamp": stamp,
    }


@pytest.fixture
def node_key():
    return ec.generate_private_key(ec.SECP384R1())


def test_authenticate_admits_a_fresh_signature_by_a_registered_key(node_key):
    allowed = frozenset({node_key_der(node_key.public_key())})
    assert authenticate(_signed_headers(node_key), allowed) == node_key_der(node_key.public_key())


@pytest.mark.parametrize("case", ["missing", "unregistered", "stale", "future", "forged", "not-pem"])
def test_authenticate_refuses(case, node_key):
    allowed = frozenset({node_key_der(node_key.public_key())})
    other = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    headers = {
        "missing": {},
        "unregistered": _signed_headers(other),
        "stale": _signed_headers(node_key, at=now - dt.timedelta(minutes=10)),
        "future": _signed_headers(node_key, at=now + dt.timedelta(minutes=1)),
        "forged": {**_signed_headers(node_key), "flwr-signature": _signed_headers(other)["flwr-signature"]},
        "not-pem": {**_signed_headers(node_key), "flwr-public-key": base64.b64encode(b"hello").decode()},
    }[case]
    with pytest.raises(Refused) as e:
        authenticate(headers, allowed)
    assert e.value.status == (412 if case == "unregistered" else 401)


def _gateway(allowed: frozenset[bytes], **kw) -> FleetGateway:
    # No upstream is ever reached in these tests: every request is refused before forwarding.
    return FleetGateway(
        upstream="https://127.0.0.1:1",
        ca_cert=os.devnull,
        allowed_keys=lambda: allowed,
        fab_verifications=lambda _: None,
        max_body_bytes=kw.get("max_body_bytes", 1 << 20),
    )


def _post(app, path: str, *, method: str = "POST", headers=None, content: bytes = b"") -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://gateway") as c:
            return await c.request(method, path, headers=headers, content=content)

    return asyncio.run(go())


@pytest.mark.parametrize("method,path", [
    ("POST", "/v1/control/start-run"), ("POST", "/v1/control/list-runs"), ("POST", "/v1/control/register-node"),
    ("POST", "/v1/control/stop-run"), ("POST", "/v1/runtime/pull-messages"), ("POST", "/v1/fleet/register-node"),
    ("POST", "/v1/fleet/unregister-node"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/health"),
    ("GET", "/v1/fleet/get-fab"), ("POST", "/v1/fleet/../control/list-runs"),
])  # fmt: skip
def test_gateway_refuses_everything_but_fleet_calls_even_signed(method, path, node_key):
    allowed = frozenset({node_key_der(node_key.public_key())})
    reply = _post(_gateway(allowed), path, method=method, headers=_signed_headers(node_key))
    assert reply.status_code == 403, (path, reply.text)
    assert "Control API is the operator's" in reply.text


def test_gateway_refuses_unsigned_and_unregistered_fleet_calls(node_key):
    allowed = frozenset({node_key_der(node_key.public_key())})
    assert _post(_gateway(allowed), "/v1/fleet/activate-node").status_code == 401
    rogue = ec.generate_private_key(ec.SECP384R1())
    reply = _post(_gateway(allowed), "/v1/fleet/pull-messages", headers=_signed_headers(rogue))
    assert reply.status_code == 412 and "not a registered SuperNode key" in reply.json()["detail"]


def test_gateway_caps_the_body(node_key):
    allowed = frozenset({node_key_der(node_key.public_key())})
    reply = _post(
        _gateway(allowed, max_body_bytes=1024),
        "/v1/fleet/push-object",
        headers=_signed_headers(node_key),
        content=b"x" * 4096,
    )
    assert reply.status_code == 413


def test_node_keys_follow_the_folder(tmp_path, node_key):
    folder = tmp_path / "flower_nodes"
    folder.mkdir()
    keys = node_keys(folder)
    assert keys() == frozenset()
    line = node_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (folder / "site-a.pub").write_bytes(line + b"\n")
    assert keys() == {node_key_der(node_key.public_key())}
    (folder / "revoked").mkdir()
    (folder / "site-a.pub").replace(folder / "revoked" / "site-a.pub")  # what revoke_node does
    assert keys() == frozenset()


def _fab(content: bytes, verifications: dict[str, str]) -> Fab:
    return Fab(hash_str=hashlib.sha256(content).hexdigest(), content=content, verifications=verifications)


def test_signed_fab_verifies_with_flowers_own_check():
    coordinator = Ed25519PrivateKey.generate()
    trusted = trusted_entities(coordinator.public_key())
    content = os.urandom(2048)
    assert _verify_fab(_fab(content, sign_fab(content, coordinator)), trusted)
    # Another FAB, another signer, or an unsigned FAB: refused.
    assert not _verify_fab(_fab(content + b"!", sign_fab(content, coordinator)), trusted)
    assert not _verify_fab(_fab(content, sign_fab(content, Ed25519PrivateKey.generate())), trusted)
    assert not _verify_fab(_fab(content, {}), trusted)


def test_get_fab_reply_carries_only_the_coordinators_signature():
    coordinator = Ed25519PrivateKey.generate()
    content = b"an app"
    signed = sign_fab(content, coordinator, signed_at=int(time.time()))
    store = {hashlib.sha256(content).hexdigest(): signed}
    body = GetFabResponse(
        fab=FabProto(hash_str="x", content=content, verifications={"someone": "{}"})
    ).SerializeToString()
    out = GetFabResponse.FromString(sign_fab_response(body, store.get))
    assert dict(out.fab.verifications) == signed
    # A FAB the coordinator never signed leaves with no verifications at all.
    other = GetFabResponse(fab=FabProto(hash_str="y", content=b"another app", verifications={"valid_license": "Valid"}))
    assert (
        dict(GetFabResponse.FromString(sign_fab_response(other.SerializeToString(), store.get)).fab.verifications) == {}
    )
