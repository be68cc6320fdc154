"""CUDA graphs of the decode step, one per batch-size bucket (as vLLM captures them).

Eager decode launches ~1,000 kernels per step and leaves the GPU idle between them: host-bound up to
batch 32. A graph replays the whole step with one launch. Its inputs live in static buffers (hidden
states, positions and slots), a batch of B sessions runs in the smallest bucket >= B, and the rows
past B point at the KV cache's pad slot, so they write to the scratch block and read nothing of
anyone's. Graphs are captured on first use of a bucket, into one shared memory pool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# step(hidden [B, hidden], idx [2, B] int64 (positions, slots)) -> [B, hidden] or logits [B, vocab]
DecodeStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def buckets_up_to(max_batch: int) -> tuple[int, ...]:
    """The standard buckets below `max_batch`, and `max_batch` itself as the last one."""
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    return tuple(b for b in BUCKETS if b < max_batch) + (max_batch,)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds n rows."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"batch of {n} exceeds the largest bucket {buckets[-1]}")


class DecodeGraphs:
    def __init__(
        self, step: DecodeStep, max_batch: int, hidden: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self._step = step
        self.buckets = buckets_up_to(max_batch)
        self._h = torch.zeros(max_batch, hidden, device=device, dtype=dtype)
        self._idx = torch.zeros(2, max_batch, device=device, dtype=torch.int64)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: Any = None  # the first graph's memory pool, shared by the others

    @property
    def captured(self) -> tuple[int, ...]:
        return tuple(sorted(self._graphs))

    def ready(self, n: int) -> bool:
        """Whether a batch of n rows replays a graph already captured."""
        return bucket_for(n, self.buckets) in self._graphs

    def run(self, h: torch.Tensor, idx: torch.Tensor, pad_slot: int) -> torch.Tensor:
        """h [B, hidden] (any device), idx [2, B] int64 on the host (pinned) -> the step's output [B, ...],
        a copy (the next replay overwrites the graph's own output)."""
        b = h.shape[0]
        n = bucket_for(b, self.buckets)
        graph, out = self._graphs.get(n) or self._capture(n, pad_slot)
        self._h[:b].copy_(h, non_blocking=True)
        self._idx[:, :b].copy_(idx, non_blocking=True)
        if n > b:
            self._idx[0, b:n] = 0
            self._idx[1, b:n] = pad_slot
        graph.replay()
        return out[:b].clone()

    def _capture(self, n: int, pad_slot: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # every row a pad row while warming up and capturing: those runs write only the scratch block
        self._idx[0, :n] = 0
        self._idx[1, :n] = pad_slot
        h, idx = self._h[:n], self._idx[:, :n]
        side = torch.cuda.Stream(device=self._h.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # first calls compile Triton kernels and settle allocations
            for _ in range(2):
                self._step(h, idx)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._step(h, idx)
        self._pool = graph.pool()
        self._graphs[n] = (graph, out)
        return graph, out
