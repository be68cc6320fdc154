"""Resuming a stream whose holder failed mid-way: the next holder continues from the text so far.

A whole-model holder's successor gets the same request with `continuation` = the text already sent
and `max_tokens` reduced by the tokens already sent, so the client sees one answer with no duplicated
text. A pipeline's successor chain gets the same request and the ids already sent (`resume`): it
re-prefills prompt + ids and its last stage replays them (`dataplane/replay.py`), so greedy and seeded
output continue token for token (issue 14). A pipeline stage whose KV pool is spent answers `Busy`
mid-stream: the same path replays the stream once the pool has room (`kv_wait.py`). What to reopen
is the router's call (`Reopen`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

from core.errors import Busy, MeshError, Unavailable
from core.serving import Generation, aclose
from core.types import Chunk, FinishReason, GenerationRequest, Usage
from placement.cluster import Stage

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
    """An open generation and what serves it: a whole-model holder (`node_id`) or a pipeline (`chain`).
    `request` is what it was opened with; `offset` is how many of the stream's ids came before it
    (from another holder, folded into `request`'s continuation)."""

    generation: Generation
    node_id: str | None
    chain: tuple[Stage, ...] = ()
    request: GenerationRequest | None = None
    offset: int = 0


# the failed one, its error (Busy: a pipeline stage's KV pool is spent), the text and ids sent so far
# -> the replacement (raises MeshError if none)
Reopen = Callable[[Served, Unavailable | Busy, str, list[int]], Awaitable[Served]]


def resuming(served: Served, request: GenerationRequest, reopen: Reopen) -> AsyncIterator[Chunk]:
    """The rest of `served`'s stream, continued elsewhere (`reopen`) whenever what serves it fails.
    Reads `served` now, so the caller may put the result in place of `served.generation.rest`."""
    return _resuming(served, served.generation.rest, request, reopen)


async def _resuming(served: Served, stream: AsyncIterator[Chunk], request: GenerationRequest,
                    reopen: Reopen) -> AsyncIterator[Chunk]:
    first = served.generation.first
    text, ids = first.text, list(first.token_ids)
    try:
        while True:
            try:
                async for chunk in stream:
                    text += chunk.text
                    ids.extend(chunk.token_ids)
                    if chunk.usage is not None and ids:  # an upstream holder sends no ids: its own count
                        # completions counted across holders; cached_tokens as the holder said
                        chunk.usage = replace(chunk.usage, prompt_tokens=max(0, chunk.usage.prompt_tokens),
                                              completion_tokens=len(ids))
                    yield chunk
                return
            except Unavailable as e:
                log.warning("%s failed mid-stream after %d tokens: %s", served.generation.served_by, len(ids), e)
                error: Unavailable | Busy = e
            except Busy as e:
                if not served.chain:  # a whole-model holder waits for blocks itself: its Busy is final
                    raise
                log.warning("%s is out of KV blocks after %d tokens (waits, then replays): %s", served.generation.served_by, len(ids), e)
                error = e
            await aclose(stream)
            if resume_request(request, text, len(ids)) is None:
                yield Chunk(finish_reason=FinishReason.LENGTH, usage=Usage(0, len(ids)))
                return
            try:
                served = await reopen(served, error, text, ids)
            except MeshError as e:
                if isinstance(e, Unavailable) or (isinstance(e, Busy) and isinstance(error, Busy)):
                    raise
                raise Unavailable(
                    f"{served.generation.served_by} failed ({error.message}) and nothing could resume it: {e.message}"
                ) from None
            log.info("resumed on %s after %d tokens", served.generation.served_by, len(ids))
            first = served.generation.first
            text += first.text
            ids.extend(first.token_ids)
            yield first
            stream = served.generation.rest
    finally:
        await aclose(stream)
