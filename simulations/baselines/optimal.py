"""Exact reference planner for small clusters: every ordered node subset, a DP over the splits.

Deliberately a different algorithm from `placement.split` (which uses greedy splits): a depth-first
walk over ordered subsets, where each extension adds one DP row "best objective with these stages
covering j layers". Shared prefixes share rows, and numpy does the inner min over stage sizes.
It only reuses `placement`'s data (memory capacities, hop costs) so both read the cluster alike.
"""

from __future__ import annotations

import math

import numpy as np

from placement.cluster import Cluster, PlacementError, Plan, Stage
from placement.plan import fit_error, score
from placement.split import Problem

MAX_NODES = 8


class _Dp:
    def __init__(self, p: Problem) -> None:
        self.p = p
        n = p.n_layers
        self.n = n
        j = np.arange(n + 1)[:, None]
        sizes = np.arange(1, n + 1)[None, :]
        self.src = j - sizes  # [N+1, N]: layers covered before a stage of `size` ending at j
        self.src_ok = self.src >= 0
        self.src_idx = np.where(self.src_ok, self.src, 0)
        self.sizes = np.arange(1, n + 1, dtype=float)
        self.best = math.inf
        self.best_chain: list[tuple[int, np.ndarray]] = []
        self.bottleneck = p.bottleneck

    def row(self, prev: np.ndarray, node: int, cap: int, hop: float) -> tuple[np.ndarray, np.ndarray]:
        """Next DP row for a stage on `node` holding at most `cap` layers; also the argmin sizes."""
        p = self.p
        cost = p.o[node] + p.t[node] * self.sizes + hop  # [N]
        vals = prev[self.src_idx]
        ok = self.src_ok & (self.sizes[None, :] <= cap)
        vals = np.maximum(vals, cost[None, :]) if self.bottleneck else vals + cost[None, :]
        vals = np.where(ok, vals, np.inf)
        arg = vals.argmin(axis=1)
        return vals[np.arange(self.n + 1), arg], arg + 1

    def walk(self, prefix: list[int], before_last: np.ndarray, chain: list[tuple[int, np.ndarray]]) -> None:
        p, n = self.p, self.n
        last = prefix[-1]
        if len(prefix) == 1:
            if p.cap_single[last] >= n:
                v = p.o[last] + p.t[last] * n
                self._offer(v, [(last, np.full(n + 1, n))])
        else:
            row, arg = self.row(before_last, last, p.cap_last[last], p.hop(last, prefix[0]))
            self._offer(float(row[n]), chain + [(last, arg)])
        if len(prefix) >= n:
            return
        cap_here = p.cap_first[last] if len(prefix) == 1 else p.cap_mid[last]
        for v in range(len(p.nodes)):
            if v in prefix:
                continue
            row, arg = self.row(before_last, last, cap_here, p.hop(last, v))
            if not np.isfinite(row[:n]).any():
                continue
            self.walk(prefix + [v], row, chain + [(last, arg)])

    def _offer(self, value: float, chain: list[tuple[int, np.ndarray]]) -> None:
        if value < self.best * (1 - 1e-12):
            self.best, self.best_chain = value, chain


def optimal_plan(cluster: Cluster) -> Plan:
    p = Problem(cluster)
    if len(p.nodes) > MAX_NODES:
        raise PlacementError(f"optimal is exhaustive and limited to {MAX_NODES} nodes, got {len(p.nodes)}")
    dp = _Dp(p)
    start = np.full(dp.n + 1, np.inf)
    start[0] = 0.0
    for first in range(len(p.nodes)):
        dp.walk([first], start, [])
    if not dp.best_chain:
        raise fit_error(p)
    # Walk the argmin arrays back from j = n to recover each stage's size.
    sizes = []
    j = dp.n
    for _node, arg in reversed(dp.best_chain):
        size = int(arg[j])
        sizes.append(size)
        j -= size
    if j != 0:
        raise AssertionError("DP back-pointers do not reach layer 0")
    stages = []
    start_layer = 0
    for (node, _arg), size in zip(dp.best_chain, reversed(sizes), strict=True):
        stages.append(Stage(p.nodes[node].id, start_layer, start_layer + size))
        start_layer += size
    return score(cluster, stages)
