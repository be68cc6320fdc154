"""Resuming a pipeline stream on a new chain: the ids generated before the fault are fed again.

The new chain is prefilled with the prompt, in one step as the first time, then fed each generated id
as a decode step of its own (issue 14). Re-prefilling prompt + ids in one step would be faster, but a
step over many positions does not give the KV cache bit for bit what one position at a time gave
(measured: a greedy stream diverged 16 tokens after the fault), so the stream would not continue as
it would have. The last stage walks each replayed id through its own token loop as logits that allow
that one token only: the sampler draws as it did the first time (a seeded generator consumes the same
random numbers for a row of the same size, whatever the probabilities), penalties and a grammar see
the same history, and `TokenOutput` counts the tokens and holds back the same text. Stage 0 drops the
replayed steps' chunks: the client had them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from core.errors import BadRequest
from core.types import Chunk


def forced_logits(like: torch.Tensor, token: int) -> torch.Tensor:
    """Logits shaped as `like` ([1, vocab]) where only `token` can be drawn."""
    if not 0 <= token < like.shape[-1]:
        raise BadRequest(f"resumed token {token} is outside the vocabulary", code="invalid_resume")
    forced = torch.full_like(like, float("-inf"))
    forced[..., token] = 0.0
    return forced


class Replay:
    """The ids a resumed stream feeds again, one decode step each, in order."""

    __slots__ = ("ids", "done")

    def __init__(self, ids: Sequence[int]) -> None:
        self.ids = tuple(ids)
        self.done = 0

    @property
    def active(self) -> bool:
        return self.done < len(self.ids)

    def logits(self, like: torch.Tensor) -> torch.Tensor:
        """What the last stage samples from for this replayed step."""
        return forced_logits(like, self.ids[self.done])

    def check(self, chunk: Chunk, token: int) -> None:
        """One replayed step came back: it must be the id it replays, and must not end the stream."""
        if token != self.ids[self.done] or chunk.finish_reason is not None:
            raise BadRequest("the resumed ids do not replay as sent", code="invalid_resume")
        self.done += 1
