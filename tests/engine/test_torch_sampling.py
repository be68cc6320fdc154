"""The torch sampling chain on synthetic logits (no model)."""

import pytest
import torch

from engine.sampling import SamplerState, sample
from engine.types import SamplingParams


def _logits(*values: float) -> torch.Tensor:
    return torch.tensor([values])


def _draws(params: SamplingParams, logits: torch.Tensor, n: int = 200) -> set[int]:
    state = SamplerState(params)
    return {sample([state], logits)[0] for _ in range(n)}


def test_greedy_takes_argmax() -> None:
    assert sample([SamplerState(SamplingParams(temperature=0))], _logits(0.1, 3.0, 2.9)) == [1]


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(temperature=1.0, top_k=2), {0, 1}),
        (SamplingParams(temperature=1.0, top_p=0.5), {0}),  # p(0) = 0.67 >= 0.5 alone
        (SamplingParams(temperature=1.0, top_p=0.9), {0, 1}),
        (SamplingParams(temperature=1.0, min_p=0.4), {0, 1}),  # p(1)/p(0) = 0.5, p(2)/p(0) = 0.05
        (SamplingParams(temperature=1.0), {0, 1, 2}),
    ],
)
def test_filters_bound_the_draws(params: SamplingParams, allowed: set[int]) -> None:
    logits = _logits(3.0, 3.0 - 0.6931, 0.0)  # probs ~ 0.64, 0.32, 0.03
    assert _draws(params, logits, 300) <= allowed
    if params.top_k == 2 or params.min_p:
        assert _draws(params, logits, 300) == allowed


def test_seed_reproducible_and_independent_of_batch() -> None:
    params = SamplingParams(temperature=1.5, seed=7)
    logits = torch.randn(1, 100)
    alone = [sample([s], logits)[0] for s in [SamplerState(params)] for _ in range(20)]
    mine, other = SamplerState(params), SamplerState(SamplingParams(temperature=1.0, seed=8))
    together = [sample([other, mine], torch.cat([torch.randn(1, 100), logits]))[1] for _ in range(20)]
    assert alone == together
    assert len(set(alone)) > 1


def test_penalties_push_repeated_tokens_down() -> None:
    logits = _logits(2.0, 1.9, 1.0)
    s = SamplerState(SamplingParams(temperature=0, frequency_penalty=0.2))
    assert sample([s], logits) == [0]
    assert sample([s], logits) == [1]  # token 0 now costs 0.2
    p = SamplerState(SamplingParams(temperature=0, presence_penalty=2.0))
    assert [sample([p], logits)[0] for _ in range(3)] == [0, 1, 2]
