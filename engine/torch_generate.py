"""The whole-model token loop behind TorchShardEngine.generate: prompt, prefill, decode, stream text."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from engine.chat_template import chat_prompt_parts
from engine.constraint import vocabulary
from engine.prompt_ids import checked_ids, continuation_ids
from engine.sampling import SamplerState, sample
from engine.session_errors import KVFullError, SessionLimitError
from engine.token_output import TokenOutput
from engine.types import Chunk, GenerationRequest, SamplingParams, check_context

if TYPE_CHECKING:
    from engine.torch_engine import TorchShardEngine

_SLOT_POLL_S = 0.1


def prompt_tokens(engine: TorchShardEngine, request: GenerationRequest) -> list[int]:
    tok = engine.tokenizer
    if request.prompt_ids is not None:  # the client's ids as they are; a continuation follows as text
        ids = checked_ids(request.prompt_ids, tok.vocab_size)
        if request.continuation:
            tail = tok.encode_parts([(request.continuation, False)])
            ids += tail[1:] if tok.add_bos and tail[:1] == [tok.bos_id] else tail  # no BOS mid-prompt
        return ids
    if request.messages is not None:  # client text apart from the template's markup (no special tokens)
        parts = chat_prompt_parts(
            engine.model.chat_template, request.messages, bos_token=tok.bos_text, eos_token=tok.eos_text,
            continuation=request.continuation,
        )
    else:
        parts = [(request.prompt or "", True), (request.continuation, False)]
    ids = tok.encode_parts(parts)
    return ids or [tok.bos_id]


def generate_whole(
    engine: TorchShardEngine, request: GenerationRequest, cancel: threading.Event
) -> Iterator[Chunk]:
    """Streams one chunk per sampled token (text may be empty while a character or a possible stop
    string is incomplete); the last chunk carries finish_reason and usage (on EOS it has no token)."""
    ids = prompt_tokens(engine, request)
    check_context(engine.max_context, len(ids), request.params.max_tokens)  # as LlamaCppEngine
    params = request.params
    sid = f"gen-{request.request_id}-{uuid.uuid4().hex[:8]}"
    while True:  # wait for a free KV slot, but not past a cancel
        if cancel.is_set():
            return
        try:
            engine.open_session(sid, params, wait_s=_SLOT_POLL_S)
            break
        except SessionLimitError:
            pass
    try:
        yield from _loop(engine, sid, ids, request, cancel)
    finally:
        engine.close_session(sid)


def _loop(
    engine: TorchShardEngine, sid: str, ids: list[int], request: GenerationRequest, cancel: threading.Event
) -> Iterator[Chunk]:
    params = request.params
    limit = check_context(engine.max_context, len(ids), params.max_tokens)
    output = TokenOutput(engine.tokenizer, params.stop, len(ids), limit)
    # Our own sampler state (not the session's): it carries the grammar, built with the vocabulary,
    # and the per-token log probabilities that `push_sampled` puts on the chunk.
    state = sampler_state(params, engine.model.path, engine.device, resumed=resumed_ids(engine, request, ids))
    x, pos = torch.tensor(ids), 0
    seen = list(ids)  # every position fed so far: what a preempted session recomputes
    while not cancel.is_set():
        try:
            logits = engine.prefill_stage(sid, x, pos)  # [1, vocab]
        except KVFullError:
            # the pool is spent: step aside (our blocks let the others finish), then recompute
            if not _wait_for_blocks(engine, sid, len(seen) + 1, cancel):
                return
            x, pos = torch.tensor(seen), 0
            continue
        pos += x.shape[0]
        token = sample([state], logits)[0]
        chunk = output.push_sampled(token, state)  # EOS, stop strings, max_tokens: as a pipeline's last stage
        yield chunk
        if chunk.finish_reason is not None:
            return
        x = torch.tensor([token])
        seen.append(token)


def _wait_for_blocks(engine: TorchShardEngine, sid: str, positions: int, cancel: threading.Event) -> bool:
    """Preempted: yields the session's blocks, then waits until the pool holds `positions` positions
    for it (sessions that finish return theirs). False when cancelled first; raises when even an
    empty pool could not hold them."""
    engine.yield_blocks(sid)
    if not engine.blocks_free(positions) and engine.n_sessions <= 1:
        raise KVFullError(f"KV cache full: {positions} positions do not fit the pool even alone")
    while not engine.blocks_free(positions):
        if cancel.wait(_SLOT_POLL_S):
            return False
    return True


def sampler_state(params: SamplingParams, model_path: str, device: str | torch.device, *,
                  resumed: Sequence[int] = ()) -> SamplerState:
    """A sampler for the token loop; a grammar needs the model's vocabulary (built once per model
    file, ~0.25 s: call this off the event loop when `params.grammar` is set). `resumed`: ids already
    generated elsewhere, fed through the grammar and penalties (`SamplerState.resume`)."""
    state = SamplerState(params, device, vocabulary=vocabulary(model_path) if params.grammar is not None else None)
    state.resume(resumed)
    return state


def resumed_ids(engine: TorchShardEngine, request: GenerationRequest, ids: list[int]) -> list[int]:
    """The prompt ids of a resumed request's continuation, when a grammar must see them; else none."""
    if not request.continuation or request.params.grammar is None:
        return []
    return continuation_ids(ids, prompt_tokens(engine, replace(request, continuation="")))


async def sampler_state_off_loop(params: SamplingParams, model_path: str, device: str | torch.device, *,
                                 resumed: Sequence[int] = ()) -> SamplerState:
    """`sampler_state` for code on the event loop: with a grammar, the vocabulary (built once per
    model file, ~0.25 s) and the grammar's compilation run on a worker thread, not on the loop."""
    if params.grammar is None:
        return sampler_state(params, model_path, device, resumed=resumed)
    return await asyncio.to_thread(sampler_state, params, model_path, device, resumed=resumed)
