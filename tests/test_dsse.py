import base64
import copy

import pytest

from common.dsse import EnvelopeError, pae, sign_envelope, verify_envelope
from common.signing import generate_signing_key, key_id, load_private_key


def test_pae_matches_the_spec_example():
    assert (
        pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


@pytest.fixture
def keys(tmp_path):
    generate_signing_key(tmp_path / "a.key", tmp_path / "a.pub")
    generate_signing_key(tmp_path / "b.key", tmp_path / "b.pub")
    return load_private_key(tmp_path / "a.key"), load_private_key(tmp_path / "b.key")


def test_sign_and_verify(keys):
    a, b = keys
    env = sign_envelope(b'{"x": 1}', "application/vnd.in-toto+json", a, key_id(a.public_key()))
    assert set(env) == {"payload", "payloadType", "signatures"}
    assert base64.b64decode(env["payload"]) == b'{"x": 1}'
    assert verify_envelope(env, {key_id(a.public_key()): a.public_key()}) == b'{"x": 1}'
    # the keyid is only a hint: a wrong hint still verifies against the right key
    env2 = copy.deepcopy(env)
    env2["signatures"][0]["keyid"] = "nonsense"
    assert verify_envelope(env2, {key_id(a.public_key()): a.public_key()}) == b'{"x": 1}'


def test_verify_refuses_wrong_key_tampered_payload_and_type(keys):
    a, b = keys
    env = sign_envelope(b"payload", "t", a, key_id(a.public_key()))
    with pytest.raises(EnvelopeError, match="no envelope signature verifies"):
        verify_envelope(env, {key_id(b.public_key()): b.public_key()})
    bad = dict(env, payload=base64.b64encode(b"payloaD").decode())
    with pytest.raises(EnvelopeError):
        verify_envelope(bad, {key_id(a.public_key()): a.public_key()})
    # the payload type is signed too
    with pytest.raises(EnvelopeError):
        verify_envelope(dict(env, payloadType="u"), {key_id(a.public_key()): a.public_key()})
    with pytest.raises(EnvelopeError, match="payloadType is 't', expected 'u'"):
        verify_envelope(env, {key_id(a.public_key()): a.public_key()}, payload_type="u")
    with pytest.raises(EnvelopeError, match="no signatures"):
        verify_envelope(dict(env, signatures=[]), {key_id(a.public_key()): a.public_key()})
