"""The node's gRPC service: GetAdvert and Generate now; the pipeline stage calls join it later."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from engine.chat_template import ChatTemplateError
from engine.local_models import LocalModel, LocalModels
from engine.runner import QueueFull
from engine.types import ContextLengthExceeded
from gateway.errors import ApiError
from gateway.local import embed_local
from node import rpc
from node.generate_wire import DIGEST, decode_embed_request, decode_request, encode_chunk, encode_embeddings

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_AFTER_KEY = "retry-after"


class NodeService:
    def __init__(
        self,
        local: LocalModels,
        signed_advert: Callable[[], bytes],
        token: str,
        load_shard: Callable[[str, int, int], Awaitable[None]],
    ) -> None:
        self._local = local
        self._signed_advert = signed_advert
        self._token = token
        self._load_shard = load_shard

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {
            "GetAdvert": rpc.unary_unary(self.get_advert),
            "Generate": rpc.unary_stream(self.generate),
            "Embed": rpc.unary_unary(self.embed),
            "LoadShard": rpc.unary_unary(self.load_shard),
        }

    async def _authorise(self, context: grpc.aio.ServicerContext) -> None:
        if not rpc.check_token(context, self._token):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "not a member of this mesh")

    async def get_advert(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        # Adverts are signed and HMAC-bound to the mesh, so they need no token: the receiver checks.
        return self._signed_advert()

    async def _decode_for_whole_model(
        self, request: bytes, context: grpc.aio.ServicerContext, decode: Callable[[dict], tuple[str, T]]
    ) -> tuple[LocalModel, T]:
        """Token check, payload decoding and the model lookup shared by the whole-model calls."""
        await self._authorise(context)
        try:
            digest, payload = decode(rpc.unpack_map(request))
        except rpc.PayloadError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        local = self._local.resolve(digest)
        if local is None or not local.whole:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {digest[:12]} is not held here")
        return local, payload

    async def generate(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        local, generation = await self._decode_for_whole_model(request, context, decode_request)
        stream = local.runner.stream(generation)
        try:
            async for chunk in stream:
                yield rpc.pack(encode_chunk(chunk))
        except QueueFull as e:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), trailing_metadata=((RETRY_AFTER_KEY, str(e.retry_after_s)),)
            )
        except (ContextLengthExceeded, ChatTemplateError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            await stream.aclose()

    async def embed(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        local, texts = await self._decode_for_whole_model(request, context, decode_embed_request)
        try:
            result = await embed_local("", local, texts)
        except ApiError as e:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if e.status == 429 else grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, e.message)
        return rpc.pack(encode_embeddings(result.vectors, result.prompt_tokens))

    async def load_shard(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Loads layers [start, end) of a GGUF this node offers, as a planner elsewhere decided."""
        await self._authorise(context)
        try:
            obj = rpc.unpack_map(request)
            digest, start, end = obj.get("model"), obj.get("start"), obj.get("end")
            if not (isinstance(digest, str) and DIGEST.match(digest) and isinstance(start, int)
                    and isinstance(end, int) and 0 <= start < end <= 1 << 16):
                raise rpc.PayloadError("LoadShard needs model, start and end")
        except rpc.PayloadError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            await self._load_shard(digest, start, end)
        except ValueError as e:  # not offered, over budget, another range held, bad range
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return rpc.pack({"ok": True})
