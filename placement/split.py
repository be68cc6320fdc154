"""Exact best split of the layers over one fixed chain of nodes.

Once the chain (which nodes, in which order) is fixed, both objectives have exact greedy answers:

* time per token (concurrency 1) is `sum(o_i + L_i * t_i) + ring hops`; hops and overheads are
  fixed by the chain, so give every stage one layer and pour the rest into the fastest stages up to
  their memory: the classic exchange argument makes this optimal.
* the bottleneck (concurrency > 1) is `max(c_i + L_i * t_i)` with `c_i` = overhead + outgoing hop;
  the optimum is the N-th smallest value among the stages' sequences `c_i + L*t_i` (L = 1..cap_i),
  found from a fractional lower bound with at most a few heap pops. Among splits reaching it, the
  same greedy-by-speed fill then minimises time per token as a tie-breaker.

The search modules only choose chains; they all score them here, so every planner in the repo
(ours and the exhaustive `optimal` baseline's DP excepted) agrees on what a chain is worth.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

from placement.cluster import Cluster, NodeSpec

_EPS = 1e-9
INF = math.inf


class Problem:
    """Per-node numbers precomputed once per `plan_split` call, indexed by position in `nodes`."""

    __slots__ = ("cluster", "nodes", "n_layers", "t", "o", "cap_mid", "cap_first", "cap_last",
                 "cap_single", "_hops", "bottleneck")

    def __init__(self, cluster: Cluster, nodes: Sequence[NodeSpec] | None = None) -> None:
        self.cluster = cluster
        self.nodes = tuple(cluster.nodes if nodes is None else nodes)
        m = cluster.model
        per_layer = cluster.per_layer_bytes
        self.n_layers = m.n_layers
        self.t = [n.layer_time_ms for n in self.nodes]
        self.o = [n.overhead_ms for n in self.nodes]

        def cap(mem: int) -> int:
            return max(0, mem // per_layer) if mem >= 0 else 0

        self.cap_mid = [cap(n.memory_bytes) for n in self.nodes]
        self.cap_first = [cap(n.memory_bytes - m.embed_bytes) for n in self.nodes]
        self.cap_last = [cap(n.memory_bytes - m.head_bytes) for n in self.nodes]
        self.cap_single = [cap(n.memory_bytes - m.embed_bytes - m.head_bytes) for n in self.nodes]
        self._hops: dict[tuple[int, int], float] = {}
        self.bottleneck = cluster.concurrency > 1

    def hop(self, a: int, b: int) -> float:
        key = (a, b) if a <= b else (b, a)
        h = self._hops.get(key)
        if h is None:
            h = self.cluster.hop_ms(self.nodes[a], self.nodes[b])
            self._hops[key] = h
        return h

    def caps(self, order: Sequence[int]) -> list[int]:
        k = len(order)
        if k == 1:
            return [self.cap_single[order[0]]]
        caps = [self.cap_mid[i] for i in order]
        caps[0] = self.cap_first[order[0]]
        caps[-1] = self.cap_last[order[-1]]
        return caps

    def ring_hops(self, order: Sequence[int]) -> list[float]:
        """Outgoing hop of each stage; the last one carries the token back to the first."""
        k = len(order)
        if k == 1:
            return [0.0]
        return [self.hop(order[i], order[(i + 1) % k]) for i in range(k)]

    def evaluate(self, order: Sequence[int]) -> tuple[float, float, float, list[int]] | None:
        """(objective, time per token, bottleneck, layers per stage), or None if it cannot fit."""
        caps = self.caps(order)
        n = self.n_layers
        if min(caps) < 1 or sum(caps) < n or len(order) > n:
            return None
        hops = self.ring_hops(order)
        t = [self.t[i] for i in order]
        c = [self.o[i] + h for i, h in zip(order, hops, strict=True)]
        if self.bottleneck:
            upper = _bottleneck_bounds(t, c, caps, n)
            if upper is None:
                return None
            layers = _fill_fastest(t, upper, n)
        else:
            layers = _fill_fastest(t, caps, n)
        tpt = sum(ti * li for ti, li in zip(t, layers, strict=True)) + sum(c)
        worst = max(ci + ti * li for ci, ti, li in zip(c, t, layers, strict=True))
        return (worst if self.bottleneck else tpt), tpt, worst, layers

    def lower_bound(self, order: Sequence[int]) -> float:
        """Cheap bound used to prune: objective with unlimited memory (ignores caps)."""
        hops = self.ring_hops(order)
        if self.bottleneck:
            return max(self.o[i] + h + self.t[i] for i, h in zip(order, hops, strict=True))
        return sum(self.o[i] for i in order) + sum(hops) + min(self.t[i] for i in order) * self.n_layers


def _fill_fastest(t: Sequence[float], caps: Sequence[int], n: int) -> list[int]:
    """One layer per stage, then the rest to the fastest stages up to `caps` (caller checked sum)."""
    layers = [1] * len(t)
    rest = n - len(t)
    for i in sorted(range(len(t)), key=t.__getitem__):
        if rest <= 0:
            break
        add = min(caps[i] - 1, rest)
        layers[i] += add
        rest -= add
    return layers


def _bottleneck_bounds(t: Sequence[float], c: Sequence[float], caps: Sequence[int], n: int) -> list[int] | None:
    """Per-stage layer limits at the smallest achievable bottleneck T*, or None if infeasible."""
    floor_t = max(ci + ti for ci, ti in zip(c, t, strict=True))
    inv = sum(1.0 / ti for ti in t)
    frac_t = (n + sum(ci / ti for ci, ti in zip(c, t, strict=True))) / inv
    lb = max(floor_t, frac_t)
    layers = [min(cap, max(1, int((lb - ci) / ti + _EPS))) for ci, ti, cap in zip(c, t, caps, strict=True)]
    total = sum(layers)
    target = lb
    if total < n:
        heap = [(c[i] + (layers[i] + 1) * t[i], i) for i in range(len(t)) if layers[i] < caps[i]]
        heapq.heapify(heap)
        while total < n:
            if not heap:
                return None
            target, i = heapq.heappop(heap)
            layers[i] += 1
            total += 1
            if layers[i] < caps[i]:
                heapq.heappush(heap, (c[i] + (layers[i] + 1) * t[i], i))
    return [min(cap, max(1, int((target - ci) / ti + _EPS))) for ci, ti, cap in zip(c, t, caps, strict=True)]
