"""Limits both ends of the exchange (common/exchange.proto) agree on."""

from __future__ import annotations

CHUNK_BYTES = 1 << 20  # bytes of bundle data per message, at most
MAX_MESSAGE_BYTES = CHUNK_BYTES + 64 * 1024  # one chunk plus protobuf framing; nothing bigger is read


def grpc_options() -> list[tuple[str, int]]:
    """gRPC channel and server options: cap every message at MAX_MESSAGE_BYTES."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
