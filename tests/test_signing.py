import os
import stat

import pytest

from common.signing import (
    SigningKeyError,
    generate_signing_key,
    key_id,
    load_private_key,
    load_public_key,
    sign,
    verify,
)
from common.tls import certificate_common_name, issue_client_cert, issue_server_cert, make_ca


def test_generate_key_mode_0600_and_roundtrip(tmp_path):
    pub = generate_signing_key(tmp_path / "keys" / "s.key", tmp_path / "keys" / "s.pub")
    assert stat.S_IMODE(os.stat(tmp_path / "keys" / "s.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "keys").st_mode) == 0o700
    priv = load_private_key(tmp_path / "keys" / "s.key")
    loaded = load_public_key(tmp_path / "keys" / "s.pub")
    assert key_id(loaded) == key_id(pub) == key_id(priv.public_key())
    assert len(key_id(pub)) == 64
    sig = sign(priv, b"data")
    assert verify(loaded, sig, b"data")
    assert not verify(loaded, sig, b"datA")
    # PEM text works as well as a path
    assert key_id(load_public_key((tmp_path / "keys" / "s.pub").read_text())) == key_id(pub)


def test_private_key_is_never_overwritten(tmp_path):
    generate_signing_key(tmp_path / "s.key", tmp_path / "s.pub")
    before = (tmp_path / "s.key").read_bytes()
    with pytest.raises(SigningKeyError, match="already exists"):
        generate_signing_key(tmp_path / "s.key", tmp_path / "s.pub")
    assert (tmp_path / "s.key").read_bytes() == before


def test_group_readable_key_is_refused(tmp_path):
    generate_signing_key(tmp_path / "s.key", tmp_path / "s.pub")
    os.chmod(tmp_path / "s.key", 0o640)
    with pytest.raises(SigningKeyError, match=r"s\.key: permissions 0640 are too open"):
        load_private_key(tmp_path / "s.key")


def test_bad_public_key_names_the_file(tmp_path):
    (tmp_path / "x.pub").write_text("not a key")
    with pytest.raises(SigningKeyError, match=r"x\.pub: not a PEM public key"):
        load_public_key(tmp_path / "x.pub")


def test_tls_material(tmp_path):
    make_ca(tmp_path / "ca", "fed")
    crt, key = issue_server_cert(tmp_path / "ca", tmp_path / "srv")
    ccrt, ckey = issue_client_cert(tmp_path / "ca", tmp_path / "cli", "site-a")
    for k in (tmp_path / "ca" / "ca.key", key, ckey):
        assert stat.S_IMODE(os.stat(k).st_mode) == 0o600
    assert certificate_common_name(ccrt.read_bytes()) == "site-a"
    assert certificate_common_name(crt.read_bytes()) == "localhost"
