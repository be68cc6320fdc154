"""Token sampling in torch with the llama.cpp engine's parameters (stop strings: engine/stop.py).

Order of the chain as in llama-cpp-python: penalties, top_k, top_p, min_p, temperature, draw; before
it, `logit_bias` is added and a grammar (`engine/constraint.py`) masks the tokens it does not allow.
Log probabilities, when asked for, are those of the model's own distribution (before bias, mask and
penalties: what a direct engine call gives); they are left on the state (`last_logprob`) for the
token loop to attach to its chunk, so that engines calling `sample` need no change.
top_p and min_p therefore see the untempered distribution, as in llama.cpp. Temperature 0 is greedy.
Presence and frequency penalties count the last `PENALTY_WINDOW` generated tokens (llama.cpp's
default window is 64 tokens too). Each request draws from its own `torch.Generator`, so a seed gives
the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence

import llguidance
import torch

from engine.constraint import Constraint
from engine.types import SamplingParams

PENALTY_WINDOW = 64


class SamplerState:
    """Per-session sampling state: parameters, RNG and the recent tokens the penalties count."""

    __slots__ = ("params", "generator", "recent", "constraint", "last_logprob", "_bias")

    def __init__(
        self, params: SamplingParams, device: str | torch.device = "cpu", *,
        vocabulary: llguidance.LLTokenizer | None = None,
    ) -> None:
        """`vocabulary` is needed to apply `params.grammar` (without it, `sample` refuses the state)."""
        self.params = params
        self.constraint: Constraint | None = None
        if params.grammar is not None and vocabulary is not None:
            self.constraint = Constraint(vocabulary, params.grammar)
        # (token, logprob, [(alternative, logprob), ...]) of the last sampled token, when asked for
        self.last_logprob: tuple[int, float, list[tuple[int, float]]] | None = None
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            ids, values = zip(*params.logit_bias, strict=True)
            self._bias = (torch.tensor(ids, device=device), torch.tensor(values, device=device))
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

    @property
    def processed(self) -> bool:
        """Whether the logits change before the sampling chain (bias, grammar, penalties)."""
        return self._bias is not None or self.constraint is not None or self.penalised

    @property
    def dead_end(self) -> bool:
        """The grammar allows no token: the caller ends the generation (finish_reason "length")."""
        return self.constraint is not None and self.constraint.dead_end

    def accept(self, token: int) -> None:
        self.recent.append(token)
        if self.constraint is not None and not self.constraint.dead_end:
            self.constraint.accept(token)

    def resume(self, ids: Sequence[int]) -> None:
        """Tokens generated before this state existed (a stream resumed on another holder from its
        text): the grammar and the penalties see them as if sampled here. A grammar that cannot take
        them is a dead end: the continuation ends with finish_reason "length" at once."""
        for token in ids:
            self.accept(token)

    def process(self, row: torch.Tensor) -> None:
        """Bias, grammar mask and penalties, in place on one row of float logits."""
        if self._bias is not None:
            ids, values = self._bias
            keep = ids < row.shape[0]  # a bias on an id beyond this vocabulary is ignored
            row.index_add_(0, ids[keep], values[keep].to(row.dtype))
        if self.constraint is not None:
            self.constraint.mask(row)
        if self.penalised:
            _apply_penalties(row, self)

    def note_logprobs(self, raw: torch.Tensor, token: int) -> None:
        k = self.params.logprobs
        if k is None:
            return
        logprobs = raw.float().log_softmax(-1)
        top = torch.topk(logprobs, k) if k else None
        alternatives = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
        self.last_logprob = (token, float(logprobs[token]), alternatives)


def sample(states: Sequence[SamplerState], logits: torch.Tensor) -> list[int]:
    """Picks one token per row of `logits` [B, vocab]; one host sync for the whole batch."""
    if len(states) != logits.shape[0]:
        raise ValueError("one sampler state per logits row")
    if any(s.params.grammar is not None and s.constraint is None for s in states):
        raise ValueError("a grammar needs the state built with the model's vocabulary")
    raw = logits
    logits = logits.float()
    if any(s.processed for s in states):
        logits = logits.clone()
        for row, s in enumerate(states):
            if s.processed:
                s.process(logits[row])
    picks = logits.argmax(dim=-1)  # [B]: the greedy rows' answer, computed for all in one op
    for row, s in enumerate(states):
        if not s.greedy and not s.dead_end:
            picks[row] = _draw(logits[row], s)
    tokens = picks.tolist()
    for row, (s, t) in enumerate(zip(states, tokens, strict=True)):
        s.note_logprobs(raw[row], t)
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
