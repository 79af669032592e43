"""Limits and encodings both ends of the exchange (common/exchange.proto) agree on."""

from __future__ import annotations

CHUNK_BYTES = 1 << 20  # bytes of bundle data per message, at most
MAX_MESSAGE_BYTES = CHUNK_BYTES + 64 * 1024  # one chunk plus protobuf framing; nothing bigger is read
# UploadChunk and DownloadChunk both carry bundle bytes in `bytes data = 2`: the key of a
# length-delimited (wire type 2) field number 2.
_DATA_KEY = bytes([2 << 3 | 2])


def grpc_options() -> list[tuple[str, int]]:
    """gRPC channel and server options: cap every message at MAX_MESSAGE_BYTES."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_data(block: bytes) -> bytes:
    """The serialized UploadChunk or DownloadChunk whose `data` is `block` (at most CHUNK_BYTES),
    byte for byte what protobuf's SerializeToString gives (tests/test_exchange.py checks).

    Why by hand: protobuf's serializer builds each 1 MiB message in a fresh arena and copies it
    out; on the benchmark machine that cost 0.46 s per 200 MB, more than TLS and the loopback
    together. Prefixing the key and length is one copy.
    """
    return _DATA_KEY + _varint(len(block)) + block


def serialize(message) -> bytes:
    """gRPC serializer for the exchange's streams: bytes are an already encoded message
    (encode_data), anything else a protobuf message."""
    return message if isinstance(message, bytes) else message.SerializeToString()
