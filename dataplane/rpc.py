"""gRPC between nodes without codegen: generic handlers, msgpack payloads, explicit size caps.

Every call carries a mesh token (derived from the mesh secret) in its metadata, so only members of
the mesh can use a node's data plane. Payloads are decoded here, at the boundary, with msgpack limits;
nothing a peer sends is ever unpickled.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

import grpc
import msgpack

SERVICE = "meshllm.Node"
MAX_MESSAGE_BYTES = 8 << 20  # a Generate request may carry a 4 MiB chat; activation frames are <= 1 MiB
AUTH_KEY = "x-meshllm-mesh"
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # reconnect soon after a refused handshake (a member that has not heard our advert yet), and never
    # back off for minutes: members come and go on a LAN
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_concurrent_streams", 256),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class PayloadError(ValueError):
    """A peer's message did not decode or validate."""


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    """msgpack with limits: no extension types, strings and lists capped, map keys must be str."""
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_MESSAGE_BYTES,
            max_bin_len=MAX_MESSAGE_BYTES,
            max_array_len=1 << 16,
            max_map_len=1 << 10,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise PayloadError(f"malformed msgpack: {e}") from None


def unpack_map(data: bytes) -> dict[str, Any]:
    obj = unpack(data)
    if not isinstance(obj, dict):
        raise PayloadError("expected a map")
    return obj


def identity(data: bytes) -> bytes:
    return data


def method_path(name: str) -> str:
    return f"/{SERVICE}/{name}"


def check_token(context: grpc.aio.ServicerContext, token: str) -> bool:
    for key, value in context.invocation_metadata() or ():
        if key == AUTH_KEY:
            return hmac.compare_digest(str(value), token)
    return False


def peer_node_id(context: grpc.aio.ServicerContext) -> str | None:
    """The node id the client's certificate names (its only SAN) under mTLS; None on plaintext."""
    names = (context.auth_context() or {}).get("x509_subject_alternative_name") or []
    if len(names) != 1:
        return None
    name = names[0]
    return name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)


def build_server(handlers: dict[str, grpc.RpcMethodHandler]) -> grpc.aio.Server:
    """The server; its port is added by the caller: secure (mTLS, `dataplane.tls`) unless the node was
    started with `--insecure-data-plane`."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    return server


def unary_unary(fn: Callable) -> grpc.RpcMethodHandler:
    """Raw bytes in and out: decoding happens in the handler so that bad input is INVALID_ARGUMENT."""
    return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=identity, response_serializer=identity)


def unary_stream(fn: Callable) -> grpc.RpcMethodHandler:
    return grpc.unary_stream_rpc_method_handler(fn, request_deserializer=identity, response_serializer=identity)


def stream_stream(fn: Callable) -> grpc.RpcMethodHandler:
    return grpc.stream_stream_rpc_method_handler(fn, request_deserializer=identity, response_serializer=identity)
