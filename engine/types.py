"""Plain data that crosses the engine boundary (defined in `core.types`), the engine's errors and the
one context-length check every engine and the pipeline's stage 0 use."""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import ContextTooLong
from core.types import Chunk, FinishReason, GenerationRequest, SamplingParams, Usage

__all__ = [
    "Chunk",
    "ContextLengthExceeded",
    "EngineLoadError",
    "FinishReason",
    "GenerationRequest",
    "KVShape",
    "TORCH_KV",
    "SamplingParams",
    "Usage",
    "check_context",
]


@dataclass(frozen=True, slots=True)
class KVShape:
    """A torch engine's KV cache: `sessions` slots (concurrent sequences) of `context_tokens` each."""

    sessions: int = 8
    context_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.sessions < 1 or self.context_tokens < 1:
            raise ValueError("a KV cache needs at least one session of one token")

    @property
    def total_tokens(self) -> int:
        return self.sessions * self.context_tokens


TORCH_KV = KVShape()  # what the torch engine reserves per model; the planner sizes offers by it


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
