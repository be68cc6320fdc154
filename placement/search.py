"""Choosing the chain: which nodes take part, and in which order.

Small clusters are searched exhaustively (every ordered subset, each scored by the exact split in
`split.py`), so the planner is optimal there. Large clusters cannot be (ordered subsets grow like
n!), so they get a pool of promising nodes, many cheap constructions (prefixes of speed / memory /
speed-per-memory rankings, ordered to follow link locality) and a budgeted local search (drop,
replace, insert, relocate). Budgets count evaluations, not seconds: the planner reads no clock, and
the same input always gives the same plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations, permutations

from placement.split import INF, Problem

EXACT_MAX_NODES = 6
POOL_PER_RANKING = 12
MOVE_CANDIDATES = 12
EVAL_BUDGET = 2500
_REL = 1e-9

Result = tuple[float, float, float, list[int]]


class _Best:
    """Keeps the best chain seen; ties go to fewer stages, then to the earlier find (determinism)."""

    __slots__ = ("problem", "value", "order", "result", "evals")

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.value = INF
        self.order: tuple[int, ...] = ()
        self.result: Result | None = None
        self.evals = 0

    def offer(self, order: Sequence[int]) -> bool:
        self.evals += 1
        r = self.problem.evaluate(order)
        if r is None:
            return False
        v = r[0]
        better = v < self.value * (1 - _REL) or (v <= self.value * (1 + _REL) and len(order) < len(self.order))
        if better:
            self.value, self.order, self.result = v, tuple(order), r
        return better


def exact_search(p: Problem, candidates: Sequence[int]) -> _Best:
    """Every ordered subset of `candidates`; prunes subsets whose memory cannot hold the model."""
    best = _Best(p)
    n = p.n_layers
    for k in range(1, min(len(candidates), n) + 1):
        for combo in combinations(candidates, k):
            if k == 1:
                best.offer(combo)
                continue
            if sum(p.cap_mid[i] for i in combo) < n:
                continue
            for perm in permutations(combo):
                if p.lower_bound(perm) >= best.value * (1 + _REL):
                    continue
                best.offer(perm)
    return best


def _rankings(p: Problem, candidates: Sequence[int]) -> list[list[int]]:
    n = p.n_layers
    by_speed = sorted(candidates, key=lambda i: (p.t[i], -p.cap_mid[i], i))
    by_memory = sorted(candidates, key=lambda i: (-p.cap_mid[i], p.t[i], i))
    # Time this node would need for its fair share of the model: small is fast *and* roomy.
    by_share = sorted(candidates, key=lambda i: (p.t[i] * min(n, p.cap_mid[i]) + p.o[i]) / min(n, p.cap_mid[i]))
    by_whole = sorted(candidates, key=lambda i: (p.cap_single[i] < n, p.t[i] * n + p.o[i], i))
    return [by_speed, by_memory, by_share, by_whole]


def _pool(p: Problem, rankings: list[list[int]]) -> list[int]:
    size = max(POOL_PER_RANKING, min(p.n_layers, 48)) if p.bottleneck else POOL_PER_RANKING
    pool: list[int] = []
    seen: set[int] = set()
    for depth in range(size):
        for r in rankings:
            if depth < len(r) and r[depth] not in seen:
                seen.add(r[depth])
                pool.append(r[depth])
    return pool


def _insert_cheapest(p: Problem, tour: list[int], node: int) -> list[int]:
    """Insert `node` into the ring where it adds the least hop time (first such place on ties)."""
    k = len(tour)
    if k < 2:
        return tour + [node]
    best_at, best_cost = k, INF
    for i in range(k):
        a, b = tour[i], tour[(i + 1) % k]
        cost = p.hop(a, node) + p.hop(node, b) - p.hop(a, b)
        if cost < best_cost - 1e-12:
            best_at, best_cost = i + 1, cost
    return tour[:best_at] + [node] + tour[best_at:]


def _neighbourhoods(p: Problem, candidates: Sequence[int], ranking: Sequence[int], seeds: int = 3) -> list[list[int]]:
    """Nodes close to a few good seeds, best first: links come in tiers (same switch, same site,
    across a backbone), and a ring that stays inside one tier avoids paying the slow hops."""
    out: list[list[int]] = []
    covered: set[int] = set()
    for s in ranking:
        if len(out) >= seeds:
            break
        if s in covered:
            continue
        hops = {i: p.hop(s, i) for i in candidates if i != s}
        if not hops:
            break
        near = min(hops.values()) * 1.5 + 0.05
        hood = [s] + [i for i in ranking if i in hops and hops[i] <= near]
        covered.update(hood)
        if len(hood) < len(candidates):
            out.append(hood)
    return out


def _construct(p: Problem, best: _Best, rankings: list[list[int]], limit: int) -> None:
    """Offer growing prefixes of each ranking, as given and as a locality-ordered ring."""
    n = p.n_layers
    for ranked in rankings:
        cap = 0
        tour: list[int] = []
        since_gain = 0
        for m in range(1, min(len(ranked), n, limit) + 1):
            cap += p.cap_mid[ranked[m - 1]]
            # Links locality: grow the ring by cheapest insertion, so a far node sits between
            # the nodes it is closest to (or is left out by the local search).
            tour = _insert_cheapest(p, tour, ranked[m - 1])
            if cap < n and m > 1:
                continue
            prefix = ranked[:m]
            gained = best.offer(prefix)
            if tour != prefix:
                gained = best.offer(tour) or gained
            if not p.bottleneck and m <= 8:
                # The ring cut decides who carries embed and head; try every cut for short rings.
                for r in range(1, m):
                    gained = best.offer(tour[r:] + tour[:r]) or gained
            since_gain = 0 if gained else since_gain + 1
            if since_gain >= 6:  # longer prefixes of this ranking stopped paying off
                break


def _neighbours(p: Problem, order: tuple[int, ...], movers: Sequence[int]):
    k = len(order)
    used = set(order)
    unused = [u for u in movers if u not in used][:MOVE_CANDIDATES]
    for i in range(k):
        if k > 1:
            yield order[:i] + order[i + 1:]
    for i in range(k):
        for u in unused:
            yield order[:i] + (u,) + order[i + 1:]
    for i in range(k + 1):
        for u in unused:
            yield order[:i] + (u,) + order[i:]
    if k <= 16:
        for i in range(k):
            rest = order[:i] + order[i + 1:]
            for j in range(k):
                if j != i:
                    yield rest[:j] + (order[i],) + rest[j:]


def local_search(p: Problem, best: _Best, movers: Sequence[int], budget: int = EVAL_BUDGET) -> None:
    """First-improvement descent from the best chain so far, until a full pass finds nothing."""
    improved = best.result is not None
    while improved and best.evals < budget:
        improved = False
        for cand in _neighbours(p, best.order, movers):
            if best.evals >= budget:
                return
            if p.lower_bound(cand) >= best.value * (1 + _REL):
                continue
            if best.offer(cand):
                improved = True
                break


def heuristic_search(p: Problem, candidates: Sequence[int]) -> _Best:
    best = _Best(p)
    rankings = _rankings(p, candidates)
    pool = _pool(p, rankings)
    limit = len(pool)
    in_pool = set(pool)
    _construct(p, best, [[i for i in r if i in in_pool] for r in rankings], limit)
    for hood in _neighbourhoods(p, candidates, rankings[2]):
        in_hood = set(hood)
        hood_rankings = [[i for i in r if i in in_hood] for r in (rankings[0], rankings[2])]
        _construct(p, best, hood_rankings, limit)
        pool.extend(i for i in hood_rankings[1][:POOL_PER_RANKING] if i not in in_pool)
        in_pool.update(pool)
    if best.result is None:
        # Memory-bound: the pool is too small, so take the roomiest nodes of the whole cluster.
        roomy = sorted(candidates, key=lambda i: (-p.cap_mid[i], p.t[i], i))[: p.n_layers]
        best.offer(roomy)
        pool = list(dict.fromkeys(pool + roomy))
    local_search(p, best, pool, budget=best.evals + EVAL_BUDGET)
    return best


def search(p: Problem) -> _Best:
    candidates = [i for i in range(len(p.nodes)) if p.cap_mid[i] >= 1 or p.cap_single[i] >= 1]
    if len(candidates) <= EXACT_MAX_NODES:
        return exact_search(p, candidates)
    return heuristic_search(p, candidates)
