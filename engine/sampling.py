"""Token sampling in torch with the llama.cpp engine's parameters (stop strings: engine/stop.py).

Order of the chain as in llama-cpp-python: penalties, top_k, top_p, min_p, temperature, draw.
top_p and min_p therefore see the untempered distribution, as in llama.cpp. Temperature 0 is greedy.
Presence and frequency penalties count the last `PENALTY_WINDOW` generated tokens (llama.cpp's
default window is 64 tokens too). Each request draws from its own `torch.Generator`, so a seed gives
the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence

import torch

from engine.types import SamplingParams

PENALTY_WINDOW = 64


class SamplerState:
    """Per-session sampling state: parameters, RNG and the recent tokens the penalties count."""

    __slots__ = ("params", "generator", "recent")

    def __init__(self, params: SamplingParams, device: str | torch.device = "cpu") -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            self.generator = torch.Generator(device=device).manual_seed(seed)
        self.recent: deque[int] = deque(maxlen=PENALTY_WINDOW)

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0

    @property
    def penalised(self) -> bool:
        return bool(self.params.presence_penalty or self.params.frequency_penalty) and bool(self.recent)

    def accept(self, token: int) -> None:
        self.recent.append(token)


def sample(states: Sequence[SamplerState], logits: torch.Tensor) -> list[int]:
    """Picks one token per row of `logits` [B, vocab]; one host sync for the whole batch."""
    if len(states) != logits.shape[0]:
        raise ValueError("one sampler state per logits row")
    logits = logits.float()
    if any(s.penalised for s in states):
        logits = logits.clone()
        for row, s in enumerate(states):
            if s.penalised:
                _apply_penalties(logits[row], s)
    picks = logits.argmax(dim=-1)  # [B]: the greedy rows' answer, computed for all in one op
    for row, s in enumerate(states):
        if not s.greedy:
            picks[row] = _draw(logits[row], s)
    tokens = picks.tolist()
    for s, t in zip(states, tokens, strict=True):
        s.accept(t)
    return tokens


def _apply_penalties(row: torch.Tensor, s: SamplerState) -> None:
    ids = torch.tensor(list(s.recent), device=row.device)
    counts = torch.zeros_like(row).index_add_(0, ids, torch.ones_like(ids, dtype=row.dtype))
    row -= counts * s.params.frequency_penalty + (counts > 0).to(row.dtype) * s.params.presence_penalty


def _draw(row: torch.Tensor, s: SamplerState) -> torch.Tensor:
    p = s.params
    row = row.clone()
    if 0 < p.top_k < row.shape[0]:
        kth = torch.topk(row, p.top_k).values[-1]
        row[row < kth] = float("-inf")
    if p.top_p < 1.0:
        sorted_logits, order = row.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (keeps the one crossing it)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= p.top_p
        row[order[drop_sorted]] = float("-inf")
    if p.min_p > 0.0:
        probs = row.softmax(-1)
        row[probs < p.min_p * probs.max()] = float("-inf")
    probs = (row / p.temperature).softmax(-1)
    return torch.multinomial(probs, 1, generator=s.generator)[0]
