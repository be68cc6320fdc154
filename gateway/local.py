"""Serving on this node: admit into the local runner and surface errors as OpenAI errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

from engine.chat_template import ChatTemplateError
from engine.local_models import LocalModel
from engine.runner import QueueFull
from engine.types import Chunk, ContextLengthExceeded, GenerationRequest
from gateway.backend import Embeddings, Generation, first_chunk
from gateway.errors import ApiError, bad_request, overloaded

_MAPPED = (QueueFull, ContextLengthExceeded, ChatTemplateError)


def as_api_error(e: Exception) -> ApiError:
    if isinstance(e, QueueFull):
        return overloaded(e.retry_after_s)
    if isinstance(e, ContextLengthExceeded):
        return bad_request(str(e), param="max_tokens", code="context_length_exceeded")
    if isinstance(e, ChatTemplateError):
        return bad_request(str(e), param="messages")
    return ApiError(500, f"generation failed: {e}", type="server_error")


async def _mapped(chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    try:
        async for chunk in chunks:
            yield chunk
    except _MAPPED as e:
        raise as_api_error(e) from None
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


async def open_local_generation(node_name: str, local: LocalModel, request: GenerationRequest) -> Generation:
    """Admits the request and waits for its first chunk, so queue and validation errors come first."""
    stream = _mapped(local.runner.stream(request))
    first = await first_chunk(stream)
    return Generation(served_by=node_name, first=first, rest=stream, model=local.model.alias)


async def embed_local(node_name: str, local: LocalModel, texts: list[str]) -> Embeddings:
    engine = local.runner.engine

    def run() -> tuple[list[list[float]], int]:
        return engine.embed(texts), sum(engine.count_tokens(t) for t in texts)

    try:
        vectors, tokens = await local.runner.run(run)
    except _MAPPED as e:
        raise as_api_error(e) from None
    return Embeddings(node_name, vectors, tokens)
