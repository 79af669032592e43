"""The attack matrix of issue 6, against a real mutual-TLS exchange on 127.0.0.1.

Every attack must be refused with an error naming its cause, leave the store's objects, index and
incoming/ exactly as they were, and leave the server serving other sites (each test ends by
uploading a fresh valid bundle from another site). Real certificates, keys and signatures only.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from common import exchange_pb2 as pb
from common import exchange_pb2_grpc as pb_grpc
from common.bundle import write_tagmanifest
from common.fileio import sha256_bytes
from common.tls import issue_client_cert, make_ca
from node.release.exchange_client import ExchangeClient, ExchangeError
from tests.helpers_attack import creds, refused, repack
from tests.helpers_exchange import PASSED_AUDIT

# ---------------------------------------------------------------- content and signatures


def test_changed_data_byte(fed):
    tar = fed.bundle("a")
    png = sorted((tar.with_suffix("") / "bag" / "data" / "images").rglob("*.png"))[0]
    data = bytearray(png.read_bytes())
    data[-20] ^= 0x01
    png.write_bytes(bytes(data))
    refused(fed, "a", repack(tar.with_suffix("")), "INVALID_ARGUMENT", r"data/images/.*\.png: sha256 mismatch")


def test_changed_audit_result(fed):
    # A failed audit turned into a pass, with the bag's manifests recomputed to match: only the
    # signature over the tag manifest digest can catch it.
    tar = fed.bundle("a", audit={**PASSED_AUDIT, "passed": False, "mia_auc": 0.93})
    bag = tar.with_suffix("") / "bag"
    (bag / "audit.json").write_text((bag / "audit.json").read_text().replace('"passed": false', '"passed": true'))
    write_tagmanifest(bag)
    refused(
        fed,
        "a",
        repack(tar.with_suffix("")),
        "INVALID_ARGUMENT",
        r"tagmanifest-sha256.txt: sha256 \w+ does not match the signed subject digest",
    )


def test_resigned_with_another_registered_sites_key(fed):
    refused(
        fed,
        "a",
        fed.bundle("a", signer="b"),
        "PERMISSION_DENIED",
        r"signature does not verify against any registered key of site 'a'",
    )


def test_upload_as_another_site_than_the_client_certificate(fed):
    # b's own valid bundle, sent over a's connection: the certificate decides who is talking.
    refused(
        fed,
        "a",
        fed.bundle("b"),
        "PERMISSION_DENIED",
        r"client certificate is for site 'a' but the upload claims site 'b'",
        as_site="b",
    )


def test_failed_audit(fed):
    refused(
        fed, "a", fed.bundle("a", audit={**PASSED_AUDIT, "passed": False}), "PERMISSION_DENIED", r"audit did not pass"
    )


def test_replayed_bundle(fed):
    tar = fed.bundle("a")
    with fed.client("a") as c:
        c.upload(tar)
    refused(fed, "a", tar, "ALREADY_EXISTS", r"bundle [0-9a-f]{32} is already stored \(replay\)")
    refused(fed, "a", fed.bundle("a", sequence=1), "ALREADY_EXISTS", r"sequence 1 of site 'a' is not above")


def test_revoked_key(fed):
    tar = fed.bundle("c")
    with fed.client("c") as c:
        rec = c.upload(tar)
    revoked = fed.ex.trust.revoke("c")
    gone = fed.ex.store.remove_signed_by("c", revoked, reason="key revoked")
    assert [g.bundle_id for g in gone] == [rec["bundle_id"]]  # the key's bundles leave the pool
    assert fed.ex.store.list("c") == [] and not (fed.ex.store.objects / f"{rec['sha256']}.tar").exists()
    # Refused as a revoked site before its upload is read (server/exchange.py, _admit).
    refused(fed, "c", fed.bundle("c"), "PERMISSION_DENIED", r"site 'c' was revoked")
    refused(fed, "c", tar, "PERMISSION_DENIED", r"site 'c' was revoked")


# ---------------------------------------------------------------- TLS identity


def _raw_health(fed, cert: Path | None, key: Path | None):
    creds = grpc.ssl_channel_credentials(
        fed.ex.ca_cert.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    with grpc.secure_channel(fed.ex.address, creds) as ch:
        return pb_grpc.ExchangeStub(ch).Health(pb.Empty(), timeout=5)


@pytest.mark.parametrize("case", ["other CA", "expired", "none"])
def test_client_certificate_refused(fed, tmp_path, case):
    before = fed.snapshot()
    if case == "other CA":
        make_ca(tmp_path / "evil-ca", "evil")
        cert, key = issue_client_cert(tmp_path / "evil-ca", tmp_path, "a")
    elif case == "expired":
        cert, key = issue_client_cert(fed.ex.cd.ca_dir, tmp_path, "a", days=0)  # ended 5 minutes ago
    else:
        cert = key = None
    with pytest.raises(grpc.RpcError) as e:
        _raw_health(fed, cert, key)
    # The handshake fails before any gRPC status exists: the client sees UNAVAILABLE.
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    if case == "expired":
        # Our own client names the cause before trying.
        with pytest.raises(ExchangeError, match=r"client certificate expired on"):
            ExchangeClient(fed.ex.address, fed.ex.ca_cert, client_cert=cert, client_key=key)
    fed.assert_unchanged(before)
    fed.assert_still_serving()


# ---------------------------------------------------------------- broken streams and messages


def test_upload_cut_off_mid_stream(fed):
    before = fed.snapshot()
    tar = fed.bundle("a")
    data = tar.read_bytes()

    def cut():
        yield pb.UploadChunk(header=pb.UploadHeader(site="a", size=len(data)))
        yield pb.UploadChunk(data=data[: len(data) // 2])
        raise ConnectionError("link lost")  # grpc cancels the call: the server sees the stream end early

    with grpc.secure_channel(fed.ex.address, creds(fed, "a")) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.ExchangeStub(ch).Upload(cut(), timeout=10)
    assert e.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INVALID_ARGUMENT)
    fed.assert_unchanged(before)
    # the same bundle, sent whole, is then accepted: the cut-off upload left nothing behind
    with fed.client("a") as c:
        assert c.upload(tar)["sha256"] == sha256_bytes(data)
    fed.assert_still_serving()


@pytest.mark.parametrize(
    "method,kind",
    [
        ("/plannode.exchange.v1.Exchange/Upload", "stream_unary"),
        ("/plannode.exchange.v1.Exchange/List", "unary_unary"),
        ("/plannode.exchange.v1.Exchange/Download", "unary_stream"),
    ],
)
def test_malformed_protobuf(fed, method, kind):
    before = fed.snapshot()
    garbage = b"\x0a\xff\xff\xff\xff\x0f" + os.urandom(32)  # a length-delimited field longer than the message
    with grpc.secure_channel(fed.ex.address, creds(fed, "a")) as ch:
        call = getattr(ch, kind)(method)  # no serializers: raw bytes on the wire
        with pytest.raises(grpc.RpcError) as e:
            if kind == "stream_unary":
                call(iter([garbage]), timeout=10)
            elif kind == "unary_stream":
                list(call(garbage, timeout=10))
            else:
                call(garbage, timeout=10)
    assert e.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT), e.value
    assert "deserializ" in e.value.details().lower()
    fed.assert_unchanged(before)
    fed.assert_still_serving()
