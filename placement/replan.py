"""`replan`: after a join or a leave, the plan that moves the fewest layers at (near) best objective.

Moving a layer means fetching its weights (hundreds of MB) and warming its KV cache, so a plan
1% slower that keeps every layer in place beats a fresh optimum that reshuffles them all. We take
the fresh optimum's objective as the yardstick, allow `tolerance` on top of it, and among chains
built from the old one (survivors in their old order, newcomers inserted or swapped in) and the
fresh one, split each to keep the most layers where they are (a DP over stages and layers covered,
with a Pareto front of (cost, kept layers) per state).
"""

from __future__ import annotations

from collections.abc import Sequence

from placement.cluster import Cluster, Plan
from placement.plan import build_plan, plan_split
from placement.split import Problem

DEFAULT_TOLERANCE = 0.02


def moved_layers(old: Plan, new: Plan) -> int:
    """Layers whose node changes between two plans of the same model."""
    return sum(a != b for a, b in zip(old.owners(), new.owners(), strict=True))


def replan(plan: Plan, cluster: Cluster, *, tolerance: float = DEFAULT_TOLERANCE) -> Plan:
    if tolerance < 0:
        raise ValueError("tolerance must be >= 0")
    fresh = plan_split(cluster)
    if plan.stages[-1].end != cluster.model.n_layers:
        return fresh  # a different model: nothing to keep
    p = Problem(cluster)
    index = {n.id: i for i, n in enumerate(p.nodes)}
    budget = fresh.objective_ms * (1 + tolerance)
    old_range = {index[s.node]: (s.start, s.end) for s in plan.stages if s.node in index}

    # Branch and bound: the exact greedy split says whether an order can meet the budget at all,
    # and each stage keeps at most min(old share, memory) layers, so the DP (the costly part) only
    # runs on orders that could beat the best found so far.
    viable = []
    for order in _candidate_orders(p, plan, fresh, index):
        r = p.evaluate(order)
        if r is None or r[0] > budget * (1 + 1e-9):
            continue
        caps = p.caps(order)
        bound = sum(min(c, old_range[i][1] - old_range[i][0]) if i in old_range else 0
                    for i, c in zip(order, caps, strict=True))
        viable.append((-bound, r[0], order))
    viable.sort()
    best: tuple[int, float, Sequence[int], list[int]] | None = None
    for neg_bound, _value, order in viable:
        if best is not None and p.n_layers + neg_bound >= best[0]:
            break  # even keeping every layer it could, this order moves as many as the best
        found = _keep_most(p, order, old_range, budget)
        if found is None:
            continue
        kept, value, layers = found
        key = (p.n_layers - kept, value)
        if best is None or key < (best[0], best[1]):
            best = (key[0], value, order, layers)
    if best is None:
        return fresh
    return build_plan(p, best[2], best[3])


def _candidate_orders(p: Problem, plan: Plan, fresh: Plan, index: dict[str, int]) -> list[tuple[int, ...]]:
    survivors = tuple(index[s.node] for s in plan.stages if s.node in index)
    fresh_order = tuple(index[s.node] for s in fresh.stages)
    newcomers = [i for i in fresh_order if i not in survivors]
    orders = {fresh_order: None}
    if survivors:
        orders[survivors] = None
    for u in newcomers:
        for base in list(orders):
            if u in base:
                continue
            for at in range(len(base) + 1):  # insert the newcomer anywhere
                orders[base[:at] + (u,) + base[at:]] = None
            for at in range(len(base)):  # or let it take a survivor's place
                orders[base[:at] + (u,) + base[at + 1:]] = None
        if len(orders) > 400:
            break
    # Survivors that the fresh plan leaves out may be the ones slowing things down.
    for i in range(len(survivors)):
        if len(survivors) > 1:
            orders[survivors[:i] + survivors[i + 1:]] = None
    return list(orders)


def _keep_most(p: Problem, order: Sequence[int], old_range: dict[int, tuple[int, int]],
               budget: float) -> tuple[int, float, list[int]] | None:
    """(kept layers, objective, layers per stage) of the split keeping most layers within budget."""
    n = p.n_layers
    k = len(order)
    caps = p.caps(order)
    if min(caps) < 1 or sum(caps) < n or k > n:
        return None
    hops = p.ring_hops(order)
    fixed = sum(hops) if not p.bottleneck else 0.0
    limit = budget - fixed + 1e-9
    # front[j]: {kept: (cost, back pointer)} for the stages so far covering j layers.
    fronts: list[dict[int, tuple[float, tuple[int, int] | None]]] = [{} for _ in range(n + 1)]
    fronts[0][0] = (0.0, None)
    history = []
    for pos, node in enumerate(order):
        t, o = p.t[node], p.o[node] + (hops[pos] if p.bottleneck else 0.0)
        lo, hi = old_range.get(node, (0, 0))
        nxt: list[dict[int, tuple[float, tuple[int, int] | None]]] = [{} for _ in range(n + 1)]
        left = k - pos - 1  # later stages need at least one layer each
        biggest = min(caps[pos], int((limit - o) / t) if limit > o else 0)  # larger stages bust the budget
        for j in range(n + 1 - left - 1):
            here = fronts[j]
            if not here:
                continue
            for size in range(1, min(biggest, n - left - j) + 1):
                stage = o + t * size
                end = j + size
                gain = max(0, min(end, hi) - max(j, lo))
                for kept, (cost, _back) in here.items():
                    total = max(cost, stage) if p.bottleneck else cost + stage
                    if total > limit:
                        continue
                    slot = nxt[end]
                    key = kept + gain
                    if key not in slot or total < slot[key][0]:
                        slot[key] = (total, (j, kept))
        fronts = [_prune(f) for f in nxt]
        history.append(fronts)
    final = fronts[n]
    if not final:
        return None
    kept = max(final)
    cost = final[kept][0]
    layers = []
    j, key = n, kept
    for pos in range(k - 1, -1, -1):
        back = history[pos][j][key][1]
        if back is None:
            raise AssertionError("replan DP lost its back pointer")
        layers.append(j - back[0])
        j, key = back
    layers.reverse()
    return kept, cost + fixed, layers


def _prune(front: dict[int, tuple[float, tuple[int, int] | None]]) -> dict[int, tuple[float, tuple[int, int] | None]]:
    """Drop entries that keep fewer layers at no lower cost."""
    out = {}
    best_cost = float("inf")
    for kept in sorted(front, reverse=True):
        cost = front[kept][0]
        if cost < best_cost:
            out[kept] = front[kept]
            best_cost = cost
    return out
