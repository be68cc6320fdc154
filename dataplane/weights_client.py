"""The client half of weight transfer: a member as a `shard.fetch.Source`, and its manifest."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable

import grpc

from dataplane import rpc
from dataplane.channels import PeerChannels
from shard.fetch import SourceBusy
from shard.manifest import MAX_MANIFEST_BYTES, Manifest, ManifestError, Piece, decode_manifest

FRAME_SILENCE_S = 30.0  # a source that sends nothing for this long is taken for dead
MANIFEST_TIMEOUT_S = 120.0


class GrpcSource:
    """Member `node_id`, holding the pieces `has` says, serving up to `streams` calls at once."""

    def __init__(self, channels: PeerChannels, node_id: str, digest: str, has: Callable[[int], bool], streams: int) -> None:
        self.node_id = node_id
        self.streams = streams
        self.has = has
        self._channels = channels
        self._digest = digest

    async def fetch(self, pieces: list[Piece]) -> AsyncIterator[tuple[int, bytes]]:
        spans: list[list[int]] = []
        for p in sorted(pieces, key=lambda p: p.index):
            if spans and spans[-1][0] + spans[-1][1] == p.index:
                spans[-1][1] += 1
            else:
                spans.append([p.index, 1])
        channel = await self._channels.connect(self.node_id)
        if channel is None:
            raise ConnectionError(f"node {self.node_id[:8]} is no member this node can call")
        call = channel.unary_stream(rpc.method_path("FetchTensors"), request_serializer=rpc.identity,
                                    response_deserializer=rpc.identity)(
            rpc.pack({"model": self._digest, "pieces": spans}), metadata=self._channels.metadata)
        try:
            frames = call.__aiter__()
            while True:
                try:
                    async with asyncio.timeout(FRAME_SILENCE_S):
                        raw = await anext(frames)
                except StopAsyncIteration:
                    return
                try:
                    obj = rpc.unpack_map(raw)
                except rpc.PayloadError as e:
                    raise ConnectionError(f"bad frame: {e}") from None
                index, data = obj.get("i"), obj.get("d")
                if type(index) is not int or not isinstance(data, bytes):
                    raise ConnectionError("bad frame")
                yield index, data
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise SourceBusy(e.details() or "busy") from None
            raise ConnectionError(f"{e.code().name}: {e.details()}") from None
        finally:
            call.cancel()


async def fetch_manifest(channels: PeerChannels, node_id: str, digest: str, manifest_id: str) -> Manifest:
    """The manifest of `digest` from `node_id`, checked against the id that node's advert names.
    Raises ManifestError (bad bytes: count the source) or ConnectionError (unreachable)."""
    channel = await channels.connect(node_id)
    if channel is None:
        raise ConnectionError(f"node {node_id[:8]} is no member this node can call")
    call = channel.unary_stream(rpc.method_path("FetchManifest"), request_serializer=rpc.identity,
                                response_deserializer=rpc.identity)(
        rpc.pack({"model": digest}), metadata=channels.metadata, timeout=MANIFEST_TIMEOUT_S)
    data = bytearray()
    try:
        async for raw in call:
            obj = rpc.unpack_map(raw)
            total, chunk = obj.get("n"), obj.get("d")
            if type(total) is not int or not isinstance(chunk, bytes) or not 0 < total <= MAX_MANIFEST_BYTES:
                raise ManifestError("bad manifest frame")
            data += chunk
            if len(data) > total:
                raise ManifestError("manifest longer than announced")
    except rpc.PayloadError as e:
        raise ManifestError(str(e)) from None
    except grpc.aio.AioRpcError as e:
        raise ConnectionError(f"{e.code().name}: {e.details()}") from None
    finally:
        call.cancel()
    if hashlib.sha256(data).hexdigest() != manifest_id:
        raise ManifestError("manifest bytes do not hash to the advertised manifest id")
    return decode_manifest(bytes(data), digest)

