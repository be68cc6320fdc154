"""Client calls of the data plane: Generate / PipelineGenerate relayed chunk by chunk, Embed, LoadShard.

Every failure leaves as a `core.errors.MeshError`: `Unavailable` when the peer could not be reached or
broke off (another may succeed), else what the peer answered (`Busy`, `BadRequest`, `Refused`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from core.errors import Unavailable
from core.types import Chunk, EmbedInput, GenerationRequest
from dataplane import rpc
from dataplane.channels import PeerChannels
from dataplane.liveness import Silence, is_heartbeat
from dataplane.status import from_rpc_error
from dataplane.wire import decode_chunk, decode_embeddings, encode_request

CALL_DEADLINE_S = 3600.0
EMBED_TIMEOUT_S = 120.0
LOAD_SHARD_TIMEOUT_S = 600.0  # dequantising a large range from disk takes a while


async def remote_generate(
    channels: PeerChannels,
    node_id: str,
    digest: str,
    request: GenerationRequest,
    *,
    method: str = "Generate",
    extra: dict[str, Any] | None = None,
) -> AsyncIterator[Chunk]:
    """Streams a holder's (or a pipeline's stage 0's) chunks. The holder heartbeats while it queues or
    works; one silent for longer than `Silence.deadline_s()` (seconds, from the gaps measured on this
    stream) is taken for hung (`Unavailable`: the router fails over or resumes elsewhere)."""
    payload = {**encode_request(digest, request), **(extra or {})}
    address = node_id[:8]  # what error messages name
    call = (await _channel(channels, node_id)).unary_stream(
        rpc.method_path(method), request_serializer=rpc.identity, response_deserializer=rpc.identity
    )(rpc.pack(payload), metadata=channels.metadata, timeout=CALL_DEADLINE_S)
    silence = Silence()
    silence.start()
    try:
        frames = call.__aiter__()
        while True:
            timeout = silence.deadline_s()
            try:
                async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancel on 3.11
                    raw = await anext(frames)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise Unavailable(f"no frame from {address} for {timeout:.1f} s") from None
            silence.heard()
            try:
                obj = rpc.unpack_map(raw)
                if is_heartbeat(obj):
                    continue
                chunk = decode_chunk(obj)
            except rpc.PayloadError as e:
                raise Unavailable(f"bad frame from {address}: {e}") from None
            yield chunk
            silence.start()  # our consumer's pace is no silence of the holder's
    except grpc.aio.AioRpcError as e:
        raise from_rpc_error(e) from None
    finally:
        call.cancel()  # a client that hung up stops the holder's generation


async def _channel(channels: PeerChannels, node_id: str) -> grpc.aio.Channel:
    channel = await channels.connect(node_id)
    if channel is None:
        raise Unavailable(f"node {node_id[:8]} is no member this node can call")
    return channel


async def _unary(channels: PeerChannels, node_id: str, method: str, payload: dict[str, Any], timeout_s: float) -> bytes:
    call = (await _channel(channels, node_id)).unary_unary(
        rpc.method_path(method), request_serializer=rpc.identity, response_deserializer=rpc.identity
    )
    try:
        return await call(rpc.pack(payload), metadata=channels.metadata, timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        raise from_rpc_error(e) from None


async def remote_embed(
    channels: PeerChannels, node_id: str, digest: str, texts: list[EmbedInput]
) -> tuple[list[list[float]], int]:
    raw = await _unary(channels, node_id, "Embed", {"model": digest, "input": texts}, EMBED_TIMEOUT_S)
    try:
        return decode_embeddings(rpc.unpack_map(raw))
    except rpc.PayloadError as e:
        raise Unavailable(f"bad embeddings from {node_id[:8]}: {e}") from None


async def remote_load_shard(channels: PeerChannels, node_id: str, digest: str, start: int, end: int) -> None:
    await _unary(channels, node_id, "LoadShard", {"model": digest, "start": start, "end": end}, LOAD_SHARD_TIMEOUT_S)
