"""Driving a chain of torch stages in-process as the pipeline does (shared by the engine tests)."""

from __future__ import annotations

import torch

from engine.torch_engine import TorchShardEngine
from engine.types import SamplingParams

GREEDY = SamplingParams(temperature=0)


def greedy_chain(
    chain: list[TorchShardEngine], sid: str, ids: list[int], n: int
) -> tuple[list[int], torch.Tensor]:
    """`n` greedy tokens through `chain`: hidden states forward, the sampled token back to stage 0.
    Returns the tokens and the prompt's last-position logits."""
    for e in chain:
        e.open_session(sid, GREEDY if e is chain[-1] else None)
    try:
        x, pos, out, first_logits = torch.tensor(ids), 0, [], None
        for _ in range(n):
            for e in chain:
                x = e.prefill_stage(sid, x, pos)
            first_logits = x if first_logits is None else first_logits
            pos += len(ids) if not out else 1
            out.append(chain[-1].sample([sid], x)[0])
            x = torch.tensor(out[-1:])
        return out, first_logits
    finally:
        for e in chain:
            e.close_session(sid)
