"""Resuming a stream whose holder failed mid-way: the next holder continues from the text so far.

The next holder gets the same request with `continuation` = the text already sent and `max_tokens`
reduced by the tokens already sent, so the client sees one answer with no duplicated text.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

from core.errors import MeshError, Unavailable
from core.serving import Generation, aclose
from core.types import Chunk, FinishReason, GenerationRequest, Usage

log = logging.getLogger(__name__)


def resume_request(request: GenerationRequest, text: str, n_tokens: int) -> GenerationRequest | None:
    """The request that continues an answer after `n_tokens` tokens of `text`, or None when the
    answer already has all the tokens it asked for."""
    params = request.params
    if params.max_tokens is not None and n_tokens >= params.max_tokens:
        return None
    return replace(
        request,
        continuation=request.continuation + text,
        params=replace(params, max_tokens=params.max_tokens - n_tokens if params.max_tokens else None),
    )


@dataclass(slots=True)
class Served:
    """An open generation and the whole-model holder serving it (None: a pipeline)."""

    generation: Generation
    node_id: str | None


def resuming(
    served: Served,
    request: GenerationRequest,
    reopen: Callable[[GenerationRequest], Awaitable[Served]],
    on_failure: Callable[[str], None],
) -> AsyncIterator[Chunk]:
    """The rest of `served`'s stream, continued on another holder (`reopen`) whenever one fails.
    Reads `served` now, so the caller may put the result in place of `served.generation.rest`."""
    g = served.generation
    return _resuming(g.first, g.rest, g.served_by, served.node_id, request, reopen, on_failure)


async def _resuming(
    first: Chunk,
    stream: AsyncIterator[Chunk],
    served_by: str,
    node_id: str | None,
    request: GenerationRequest,
    reopen: Callable[[GenerationRequest], Awaitable[Served]],
    on_failure: Callable[[str], None],
) -> AsyncIterator[Chunk]:
    text, n_tokens = first.text, len(first.token_ids)
    try:
        while True:
            try:
                async for chunk in stream:
                    text += chunk.text
                    n_tokens += len(chunk.token_ids)
                    if chunk.usage is not None:
                        chunk.usage = Usage(max(0, chunk.usage.prompt_tokens), n_tokens, chunk.usage.cached_tokens)
                    yield chunk
                return
            except Unavailable as e:
                log.warning("holder %s failed mid-stream after %d tokens: %s", served_by, n_tokens, e)
                if node_id is not None:
                    on_failure(node_id)
            await aclose(stream)
            resumed = resume_request(request, text, n_tokens)
            if resumed is None:
                yield Chunk(finish_reason=FinishReason.LENGTH, usage=Usage(0, n_tokens))
                return
            try:
                served = await reopen(resumed)
            except MeshError:
                raise Unavailable(
                    f"the holder serving this stream ({served_by}) failed and no other holder could resume it"
                ) from None
            served_by, node_id = served.generation.served_by, served.node_id
            log.info("resumed on %s after %d tokens", served_by, n_tokens)
            first = served.generation.first
            text += first.text
            n_tokens += len(first.token_ids)
            yield first
            stream = served.generation.rest
    finally:
        await aclose(stream)
