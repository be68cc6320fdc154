"""NodeBackend: the gateway's view of this node — local engines now, the mesh through the router."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from engine.chat_template import ChatTemplateError
from engine.llama_cpp_engine import ContextLengthExceeded
from engine.runner import QueueFull
from engine.types import Chunk, GenerationRequest
from gateway.backend import Embeddings, Generation, ModelListing
from gateway.errors import ApiError, bad_request, model_not_found, overloaded
from node.local_models import LocalModel, LocalModels


def _as_api_error(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFull):
        return overloaded(e.retry_after_s)
    if isinstance(e, ContextLengthExceeded):
        return bad_request(str(e), param="max_tokens", code="context_length_exceeded")
    if isinstance(e, ChatTemplateError):
        return bad_request(str(e), param="messages")
    return ApiError(500, f"generation failed: {e}", type="server_error")


_MAPPED = (ApiError, QueueFull, ContextLengthExceeded, ChatTemplateError)


async def _mapped(chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    try:
        async for chunk in chunks:
            yield chunk
    except _MAPPED as e:
        raise _as_api_error(e) from None
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


async def open_local_generation(node_name: str, local: LocalModel, request: GenerationRequest) -> Generation:
    """Admits the request and waits for its first chunk, so queue and validation errors come first."""
    stream = _mapped(local.runner.stream(request))
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        first = Chunk()
    except BaseException:
        await stream.aclose()
        raise
    return Generation(served_by=node_name, first=first, rest=stream, model=local.model.alias)


class NodeBackend:
    def __init__(self, node_name: str, local: LocalModels, describe_self: Callable[[], dict]) -> None:
        self.node_name = node_name
        self.local = local
        self._describe_self = describe_self

    def list_models(self) -> list[ModelListing]:
        return [
            ModelListing(lm.model.alias, lm.model.digest, lm.model.n_layers, lm.model.context_length, (self.node_name,))
            for lm in self.local.all()
            if lm.whole
        ]

    def _resolve(self, model: str) -> LocalModel:
        local = self.local.resolve(model)
        if local is None or not local.whole:
            raise model_not_found(model, sorted(m.alias for m in self.list_models()))
        return local

    async def open_generation(self, model: str, request: GenerationRequest) -> Generation:
        return await open_local_generation(self.node_name, self._resolve(model), request)

    async def embed(self, model: str, texts: list[str]) -> Embeddings:
        local = self._resolve(model)
        engine = local.runner.engine
        try:
            vectors = await local.runner.run(lambda: engine.embed(texts))
            tokens = sum(engine.count_tokens(t) for t in texts)
        except _MAPPED as e:
            raise _as_api_error(e) from None
        return Embeddings(self.node_name, vectors, tokens)

    def describe_self(self) -> dict:
        return self._describe_self()
