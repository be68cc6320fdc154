"""Serving on this node: admit into the local runner; every failure leaves as a `core.errors.MeshError`.

Used by the router (a request this node serves itself) and by the gRPC service (a peer's request).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from core.errors import BadRequest, Internal, MeshError
from core.serving import Embeddings, Generation, aclose, first_chunk
from core.types import Chunk, EmbedInput, GenerationRequest
from engine.chat_template import ChatTemplateError
from engine.local_models import LocalModel


def as_mesh_error(e: Exception) -> MeshError:
    """An engine's exception in words of the mesh (QueueFull and ContextLengthExceeded already are)."""
    if isinstance(e, MeshError):
        return e
    if isinstance(e, ChatTemplateError):
        return BadRequest(str(e), param="messages")
    return Internal(f"generation failed: {e}")


async def _mapped(chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    try:
        async for chunk in chunks:
            yield chunk
    except (MeshError, ChatTemplateError) as e:
        raise as_mesh_error(e) from None
    finally:
        await aclose(chunks)


def local_stream(local: LocalModel, request: GenerationRequest) -> AsyncIterator[Chunk]:
    return _mapped(local.runner.stream(request))


async def open_local_generation(node_name: str, local: LocalModel, request: GenerationRequest) -> Generation:
    """Admits the request and waits for its first chunk, so queue and validation errors come first."""
    stream = local_stream(local, request)
    first = await first_chunk(stream)
    return Generation(served_by=node_name, first=first, rest=stream, model=local.model.alias)


async def embed_local(node_name: str, local: LocalModel, texts: list[EmbedInput]) -> Embeddings:
    engine = local.runner.engine

    def run() -> tuple[list[list[float]], int]:
        return engine.embed(texts), sum(len(t) if isinstance(t, tuple) else engine.count_tokens(t) for t in texts)

    try:
        vectors, tokens = await local.runner.run(run)
    except (MeshError, ChatTemplateError) as e:
        raise as_mesh_error(e) from None
    return Embeddings(node_name, vectors, tokens)
