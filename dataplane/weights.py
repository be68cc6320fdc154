"""Serving weights to members: `FetchManifest` and `FetchTensors` (both unary-stream, msgpack frames).

- `FetchManifest {model}` streams the manifest's bytes in frames of at most 1 MiB.
- `FetchTensors {model, pieces: [[first, count], ...]}` streams `{i, d}` frames, one piece (<= 1 MiB,
  the manifest's piece size) each, for pieces this node holds; at most `MAX_PIECES_PER_CALL` a call.
A model this node does not hold is NOT_FOUND; a piece it does not hold is INVALID_ARGUMENT. Requests
name a digest and piece indexes only: the file is whatever this node itself has for that digest.
At most `serve_streams` calls run at once (advertised as `serve_streams`); beyond that the caller gets
RESOURCE_EXHAUSTED and tries again or elsewhere.

Test-only faults (`MESHLLM_FAULT_WEIGHTS`): `corrupt` flips a byte of every piece served; `slow:S`
sleeps S seconds before each piece.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from core.errors import BadRequest, Busy, ModelNotFound
from dataplane import rpc
from dataplane.service import IsMember, authorise
from dataplane.status import abort
from dataplane.wire import DIGEST
from shard.manifest import Manifest, Piece

MAX_PIECES_PER_CALL = 64
MANIFEST_FRAME_BYTES = 1 << 20
FAULT_ENV = "MESHLLM_FAULT_WEIGHTS"


@dataclass(frozen=True, slots=True)
class Served:
    """What this node can serve of one model: its manifest and a reader of the pieces it holds."""

    manifest: Manifest
    manifest_bytes: bytes
    has: Callable[[int], bool]
    read: Callable[[Piece], bytes]  # blocking
    pieces: tuple[Piece, ...]  # the manifest's pieces, by index


Lookup = Callable[[str], Served | None]


class ServeStats:
    def __init__(self) -> None:
        self.bytes_served = 0
        self.calls = 0
        self.refused_busy = 0


class WeightsService:
    def __init__(self, lookup: Lookup, token: str, serve_streams: int, is_member: IsMember | None = None) -> None:
        self._lookup = lookup
        self._token = token
        self._is_member = is_member
        self.serve_streams = serve_streams
        self._streams = 0
        self.stats = ServeStats()
        fault = os.environ.get(FAULT_ENV, "")
        self._corrupt = fault == "corrupt"
        self._delay_s = float(fault.partition(":")[2]) if fault.startswith("slow:") else 0.0

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {"FetchManifest": rpc.unary_stream(self.fetch_manifest),
                "FetchTensors": rpc.unary_stream(self.fetch_tensors)}

    async def _served(self, request: bytes, context: grpc.aio.ServicerContext) -> tuple[Served, dict]:
        await authorise(context, self._token, self._is_member)
        try:
            obj = rpc.unpack_map(request)
        except rpc.PayloadError as e:
            await abort(context, BadRequest(str(e)))
        digest = obj.get("model")
        if not isinstance(digest, str) or not DIGEST.match(digest):
            await abort(context, BadRequest("model must be a sha256 hex digest"))
        served = self._lookup(digest)
        if served is None:
            await abort(context, ModelNotFound(digest, [], f"model {digest[:12]} is not held here"))
        return served, obj

    async def fetch_manifest(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        served, _ = await self._served(request, context)
        data = served.manifest_bytes
        for off in range(0, len(data), MANIFEST_FRAME_BYTES):
            await context.write(rpc.pack({"n": len(data), "d": data[off : off + MANIFEST_FRAME_BYTES]}))

    async def fetch_tensors(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        served, obj = await self._served(request, context)
        pieces = _requested_pieces(obj.get("pieces"), served)
        if pieces is None:
            await abort(context, BadRequest(f"pieces must be at most {MAX_PIECES_PER_CALL} pieces this node holds"))
        if self._streams >= self.serve_streams:
            self.stats.refused_busy += 1
            await abort(context, Busy(1, f"serving {self._streams} weight streams already"))
        self._streams += 1
        self.stats.calls += 1
        try:
            for piece in pieces:
                if self._delay_s:
                    await asyncio.sleep(self._delay_s)
                data = await asyncio.to_thread(served.read, piece)
                if self._corrupt and data:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                await context.write(rpc.pack({"i": piece.index, "d": data}))
                self.stats.bytes_served += len(data)
        finally:
            self._streams -= 1


def _requested_pieces(spans: object, served: Served) -> list[Piece] | None:
    if not isinstance(spans, list) or not 0 < len(spans) <= MAX_PIECES_PER_CALL:
        return None
    all_pieces = served.pieces
    out: list[Piece] = []
    for span in spans:
        if not (isinstance(span, list) and len(span) == 2 and all(type(x) is int for x in span)):
            return None
        first, count = span
        if not (0 <= first and 0 < count <= MAX_PIECES_PER_CALL and first + count <= len(all_pieces)):
            return None
        out.extend(all_pieces[first : first + count])
        if len(out) > MAX_PIECES_PER_CALL:
            return None
    return out if all(served.has(p.index) for p in out) else None
