"""The node's gRPC service for whole models: GetAdvert, Generate, Embed and LoadShard."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from core.errors import BadRequest, MeshError, ModelNotFound, Refused
from core.serving import aclose
from dataplane import rpc
from dataplane.liveness import Beating
from dataplane.load_gate import LoadGate
from dataplane.local import embed_local, local_stream
from dataplane.stage_sessions import peer_key
from dataplane.status import abort
from dataplane.wire import (
    decode_embed_request,
    decode_load_shard,
    decode_request,
    encode_chunk,
    encode_embeddings,
)
from engine.local_models import LocalModel, LocalModels

log = logging.getLogger(__name__)
T = TypeVar("T")


IsMember = Callable[[str], bool]  # under mTLS: is this node id a current member (in our PeerTable)?


async def authorise(context: grpc.aio.ServicerContext, token: str, is_member: IsMember | None = None) -> None:
    """The mesh token on every call; under mTLS also the client certificate's node id, still a member
    now (the handshake checked it when the connection opened, which may be long ago)."""
    if not rpc.check_token(context, token):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "not a member of this mesh")
    if is_member is not None:
        peer = rpc.peer_node_id(context)
        if peer is None or not is_member(peer):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "not a current member of this mesh")


class NodeService:
    def __init__(
        self,
        local: LocalModels,
        signed_advert: Callable[[], bytes],
        token: str,
        load_shard: Callable[[str, int, int], Awaitable[None]],
        load_gate: LoadGate | None = None,
        is_member: IsMember | None = None,
    ) -> None:
        self._local = local
        self._signed_advert = signed_advert
        self._token = token
        self._is_member = is_member
        self._load_shard = load_shard
        self._gate = load_gate or LoadGate()

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {
            "GetAdvert": rpc.unary_unary(self.get_advert),
            "Generate": rpc.unary_stream(self.generate),
            "Embed": rpc.unary_unary(self.embed),
            "LoadShard": rpc.unary_unary(self.load_shard),
        }

    async def get_advert(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        # Signed and HMAC-bound, but it names our models and addresses: members only (issue 11, 15).
        await authorise(context, self._token, self._is_member)
        return self._signed_advert()

    async def _decode_for_whole_model(
        self, request: bytes, context: grpc.aio.ServicerContext, decode: Callable[[dict], tuple[str, T]]
    ) -> tuple[LocalModel, T]:
        """Token check, payload decoding and the model lookup shared by the whole-model calls."""
        await authorise(context, self._token, self._is_member)
        try:
            digest, payload = decode(rpc.unpack_map(request))
        except rpc.PayloadError as e:
            await abort(context, BadRequest(str(e)))
        local = self._local.resolve(digest)
        if local is None or not local.whole:
            await abort(context, ModelNotFound(digest, [], f"model {digest[:12]} is not held here"))
        return local, payload

    async def generate(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        """Streams the chunks, with heartbeats while queued or silent (`liveness.py`)."""
        local, generation = await self._decode_for_whole_model(request, context, decode_request)
        error: MeshError | None = None
        stream = local_stream(local, generation)
        async with Beating(context) as out:
            try:
                async for chunk in stream:
                    await out.write(rpc.pack(encode_chunk(chunk)))
            except MeshError as e:
                error = e
            finally:
                await aclose(stream)
        if error is not None:
            await abort(context, error)

    async def embed(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        local, texts = await self._decode_for_whole_model(request, context, decode_embed_request)
        try:
            result = await embed_local("", local, texts)
        except MeshError as e:
            await abort(context, e)
        return rpc.pack(encode_embeddings(result.vectors, result.prompt_tokens))

    async def load_shard(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Loads layers [start, end) of a GGUF this node offers, as a planner elsewhere decided."""
        await authorise(context, self._token, self._is_member)
        try:
            digest, start, end = decode_load_shard(rpc.unpack_map(request))
        except rpc.PayloadError as e:
            await abort(context, BadRequest(str(e)))
        try:
            async with self._gate.admit(peer_key(context), digest, start, end):
                await self._load_shard(digest, start, end)
        except ValueError as e:  # not offered, over budget, another range held, bad range
            await abort(context, Refused(str(e)))
        except MeshError as e:  # the gate: too many loads asked by this peer, or one already running
            await abort(context, e)
        return rpc.pack({"ok": True})
