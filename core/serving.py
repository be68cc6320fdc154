"""What the gateway needs from the mesh: model listing, generations and embeddings.

The gateway speaks HTTP and OpenAI; a backend decides where a request runs (this node's engine, or
other nodes over the data plane) and says which node served it. Its errors are `core.errors.MeshError`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from core.types import Chunk, EmbedInput, GenerationRequest


@dataclass(frozen=True, slots=True)
class ModelListing:
    alias: str
    digest: str
    n_layers: int
    context_length: int
    nodes: tuple[str, ...]  # names of the nodes holding it (whole or as a complete pipeline)


@dataclass(slots=True)
class Generation:
    """An admitted generation whose first chunk has been produced (so errors surface before HTTP 200)."""

    served_by: str
    first: Chunk
    rest: AsyncIterator[Chunk]
    model: str = ""
    extra_headers: dict[str, str] = field(default_factory=dict)

    async def chunks(self) -> AsyncIterator[Chunk]:
        yield self.first
        async for chunk in self.rest:
            yield chunk

    async def aclose(self) -> None:
        await aclose(self.rest)


async def aclose(stream: AsyncIterator[Chunk]) -> None:
    """Closes an async generator (a plain iterator has nothing to close)."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


async def first_chunk(stream: AsyncIterator[Chunk]) -> Chunk:
    """Waits for a stream's first chunk (closing the stream if that fails), so errors surface before
    any HTTP header is sent."""
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return Chunk()
    except BaseException:
        await aclose(stream)
        raise


@dataclass(frozen=True, slots=True)
class Embeddings:
    served_by: str
    vectors: list[list[float]]
    prompt_tokens: int


class Backend(Protocol):
    node_name: str

    def list_models(self) -> list[ModelListing]: ...

    async def open_generation(self, model: str, request: GenerationRequest) -> Generation:
        """Raises core.errors.MeshError (ModelNotFound, Busy, BadRequest, Unavailable, ...)."""
        ...

    async def embed(self, model: str, texts: list[EmbedInput]) -> Embeddings: ...

    def describe_self(self) -> dict: ...
