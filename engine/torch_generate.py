"""The whole-model token loop behind TorchShardEngine.generate: prompt, prefill, decode, stream text."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from engine.chat_template import chat_prompt_parts
from engine.constraint import vocabulary
from engine.sampling import SamplerState, sample
from engine.token_output import TokenOutput
from engine.types import Chunk, GenerationRequest, SamplingParams, check_context

if TYPE_CHECKING:
    from engine.torch_engine import TorchShardEngine

_SLOT_POLL_S = 0.1


def prompt_tokens(engine: TorchShardEngine, request: GenerationRequest) -> list[int]:
    tok = engine.tokenizer
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
    from engine.torch_engine import SessionLimitError  # here: torch_engine imports this module

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
    state = sampler_state(params, engine.model.path, engine.device)
    x, pos = torch.tensor(ids), 0
    while not cancel.is_set():
        logits = engine.prefill_stage(sid, x, pos)  # [1, vocab]
        pos += x.shape[0]
        token = sample([state], logits)[0]
        chunk = output.push_sampled(token, state)  # EOS, stop strings, max_tokens: as a pipeline's last stage
        yield chunk
        if chunk.finish_reason is not None:
            return
        x = torch.tensor([token])


def sampler_state(params: SamplingParams, model_path: str, device: str | torch.device) -> SamplerState:
    """A sampler for the token loop; a grammar needs the model's vocabulary."""
    return SamplerState(params, device, vocabulary=vocabulary(model_path) if params.grammar is not None else None)
