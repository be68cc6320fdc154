"""Plain data that crosses the engine boundary (defined in `core.types`), the engine's errors and the
one context-length check every engine and the pipeline's stage 0 use."""

from __future__ import annotations

from core.errors import ContextTooLong
from core.types import Chunk, FinishReason, GenerationRequest, SamplingParams, TokenLogprob, Usage

__all__ = [
    "Chunk",
    "ContextLengthExceeded",
    "EngineLoadError",
    "FinishReason",
    "GenerationRequest",
    "SamplingParams",
    "TokenLogprob",
    "Usage",
    "check_context",
]


class ContextLengthExceeded(ContextTooLong, ValueError):
    """The prompt plus the requested completion does not fit the context window."""


class EngineLoadError(Exception):
    """An engine could not load a model file."""


def check_context(n_ctx: int, n_prompt: int, wanted: int | None, *, what: str = "this model's") -> int:
    """How many tokens may be generated after a prompt of `n_prompt` tokens in a context of `n_ctx`;
    raises ContextLengthExceeded when the prompt leaves no room or `wanted` (max_tokens) does not fit."""
    room = n_ctx - n_prompt
    if room <= 0 or (wanted is not None and wanted > room):
        raise ContextLengthExceeded(
            f"{what} context is {n_ctx} tokens; the prompt has {n_prompt} and {wanted or 1} more were requested"
        )
    return wanted or room
