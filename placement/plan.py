"""`plan_split`: the public entry point that turns a cluster into a chain of layer ranges."""

from __future__ import annotations

from collections.abc import Sequence

from placement.cluster import Cluster, PlacementError, Plan, Stage
from placement.search import search
from placement.split import Problem


def plan_split(cluster: Cluster) -> Plan:
    """Best chain of stages for `cluster.model` over `cluster.nodes`.

    Concurrency 1 minimises time per token; concurrency > 1 minimises the slowest stage (compute
    plus outgoing hop). Nodes that would slow the plan are left out. Pure: no I/O, no clock, and
    the same cluster always gives the same plan. Raises `PlacementError` (with the shortfall in
    bytes) when no arrangement of the nodes can hold the model.
    """
    p = Problem(cluster)
    best = search(p)
    if best.result is None:
        raise fit_error(p)
    return build_plan(p, best.order, best.result[3])


def build_plan(p: Problem, order: Sequence[int], layers: Sequence[int]) -> Plan:
    stages = []
    start = 0
    for i, n in zip(order, layers, strict=True):
        stages.append(Stage(p.nodes[i].id, start, start + n))
        start += n
    return score(p.cluster, stages)


def score(cluster: Cluster, stages: Sequence[Stage]) -> Plan:
    """A plan for given stages with both costs filled in; checks memory and coverage."""
    by_id = {n.id: n for n in cluster.nodes}
    p = Problem(cluster, [by_id[s.node] for s in stages])
    order = list(range(len(stages)))
    caps = p.caps(order)
    if stages[-1].end != cluster.model.n_layers:
        raise PlacementError(f"plan ends at layer {stages[-1].end}, model has {cluster.model.n_layers}")
    for s, cap in zip(stages, caps, strict=True):
        if s.n_layers > cap:
            raise PlacementError(f"stage on {s.node} holds {s.n_layers} layers but its memory fits {cap}")
    hops = p.ring_hops(order)
    times = [p.o[i] + p.t[i] * s.n_layers for i, s in enumerate(stages)]
    return Plan(
        stages=tuple(stages),
        time_per_token_ms=sum(times) + sum(hops),
        bottleneck_ms=max(tm + h for tm, h in zip(times, hops, strict=True)),
        concurrency=cluster.concurrency,
    )


def max_layers_that_fit(p: Problem) -> int:
    """Most layers any arrangement can hold: the whole cluster, embed and head on the cheapest ends."""
    n = len(p.nodes)
    best = max(p.cap_single, default=0)
    usable = [i for i in range(n) if p.cap_mid[i] >= 1]
    if len(usable) >= 2:
        total = sum(p.cap_mid[i] for i in usable)
        loss_f = sorted(usable, key=lambda i: p.cap_mid[i] - p.cap_first[i])[:2]
        loss_l = sorted(usable, key=lambda i: p.cap_mid[i] - p.cap_last[i])[:2]
        for f in loss_f:
            for last in loss_l:
                if f != last and p.cap_first[f] >= 1 and p.cap_last[last] >= 1:
                    loss = p.cap_mid[f] - p.cap_first[f] + p.cap_mid[last] - p.cap_last[last]
                    best = max(best, total - loss)
    return min(best, p.n_layers)


def fit_error(p: Problem) -> PlacementError:
    c = p.cluster
    m = c.model
    per_layer = c.per_layer_bytes
    need = m.n_layers * per_layer + m.embed_bytes + m.head_bytes
    have = sum(n.memory_bytes for n in c.nodes)
    fits = max_layers_that_fit(p)
    # Whole layers cannot be split across nodes, so the byte shortfall is at least the missing
    # layers' worth, and at least the raw difference between need and memory.
    short = max((m.n_layers - fits) * per_layer, need - have, 1)
    return PlacementError(
        f"model does not fit: it needs {need} bytes ({m.n_layers} layers of {per_layer} bytes "
        f"including KV cache for {c.context_tokens} tokens x {c.concurrency} sequences, plus "
        f"embedding and head); the {len(c.nodes)} node(s) hold at most {fits} of {m.n_layers} layers; "
        f"short by {short} bytes ({short / 2**30:.2f} GiB)",
        shortfall_bytes=short,
    )
