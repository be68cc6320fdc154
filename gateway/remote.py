"""Client side of the data plane: channels to peers and a Generate call relayed chunk by chunk."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from engine.types import Chunk, GenerationRequest
from node import rpc
from node.generate_wire import decode_chunk, decode_embeddings, encode_request

FIRST_FRAME_TIMEOUT_S = 60.0  # admission + prompt processing on a slow holder
IDLE_FRAME_TIMEOUT_S = 30.0  # a holder that goes silent this long mid-stream has failed
CALL_DEADLINE_S = 3600.0


class HolderFailed(Exception):
    """The holder could not be reached or broke off; another holder may succeed."""


class HolderRefused(Exception):
    """The holder answered with a definite error (busy, bad request): retrying elsewhere may not help."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s


_FAILURE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.NOT_FOUND,  # the holder dropped the model since its advert
    grpc.StatusCode.UNAUTHENTICATED,
}


class PeerChannels:
    """One long-lived channel per peer address (HTTP/2 multiplexes all calls to it)."""

    def __init__(self, token: str) -> None:
        self._token = token
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=rpc.CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((rpc.AUTH_KEY, self._token),)

    async def forget(self, address: str) -> None:
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


def _map_rpc_error(e: grpc.aio.AioRpcError) -> Exception:
    if e.code() in _FAILURE_CODES:
        return HolderFailed(f"{e.code().name}: {e.details()}")
    retry_after = 1
    for key, value in e.trailing_metadata() or ():
        if key == "retry-after" and str(value).isdigit():
            retry_after = int(value)
    return HolderRefused(e.code(), e.details() or e.code().name, retry_after)


async def remote_generate(
    channels: PeerChannels,
    address: str,
    digest: str,
    request: GenerationRequest,
    *,
    method: str = "Generate",
    extra: dict | None = None,
) -> AsyncIterator[Chunk]:
    """Streams a holder's (or a pipeline's stage 0's) chunks. Raises HolderFailed or HolderRefused."""
    payload = {**encode_request(digest, request), **(extra or {})}
    call = channels.channel(address).unary_stream(
        rpc.method_path(method), request_serializer=rpc.identity, response_deserializer=rpc.identity
    )(rpc.pack(payload), metadata=channels.metadata, timeout=CALL_DEADLINE_S)
    timeout = FIRST_FRAME_TIMEOUT_S
    try:
        frames = call.__aiter__()
        while True:
            try:
                async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancel on 3.11
                    raw = await anext(frames)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise HolderFailed(f"no frame from {address} for {timeout:.0f} s") from None
            timeout = IDLE_FRAME_TIMEOUT_S
            try:
                yield decode_chunk(rpc.unpack_map(raw))
            except rpc.PayloadError as e:
                raise HolderFailed(f"bad frame from {address}: {e}") from None
    except grpc.aio.AioRpcError as e:
        raise _map_rpc_error(e) from None
    finally:
        call.cancel()  # a client that hung up stops the holder's generation


EMBED_TIMEOUT_S = 120.0


async def remote_embed(
    channels: PeerChannels, address: str, digest: str, texts: list[str]
) -> tuple[list[list[float]], int]:
    call = channels.channel(address).unary_unary(
        rpc.method_path("Embed"), request_serializer=rpc.identity, response_deserializer=rpc.identity
    )
    try:
        raw = await call(rpc.pack({"model": digest, "input": texts}), metadata=channels.metadata, timeout=EMBED_TIMEOUT_S)
    except grpc.aio.AioRpcError as e:
        raise _map_rpc_error(e) from None
    try:
        return decode_embeddings(rpc.unpack_map(raw))
    except rpc.PayloadError as e:
        raise HolderFailed(f"bad embeddings from {address}: {e}") from None


LOAD_SHARD_TIMEOUT_S = 600.0  # dequantising a large range from disk takes a while


async def remote_load_shard(channels: PeerChannels, address: str, digest: str, start: int, end: int) -> None:
    call = channels.channel(address).unary_unary(
        rpc.method_path("LoadShard"), request_serializer=rpc.identity, response_deserializer=rpc.identity
    )
    payload = rpc.pack({"model": digest, "start": start, "end": end})
    try:
        await call(payload, metadata=channels.metadata, timeout=LOAD_SHARD_TIMEOUT_S)
    except grpc.aio.AioRpcError as e:
        raise _map_rpc_error(e) from None
