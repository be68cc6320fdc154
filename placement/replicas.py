"""Spare capacity on purpose (issue 14): N disjoint chains for an offered model, when memory allows. Pure.

The first chain is the planner's best over every offering node; each further one is planned over the
nodes no earlier chain uses. When that greedy order leaves too few nodes (the best first chain took
more nodes than it needed), the offering nodes are dealt round-robin by free memory into N groups and
each group is planned alone; whichever way yields more chains wins (the greedy one on a tie).
"""

from __future__ import annotations

from collections.abc import Sequence

from discovery.advert import NodeAdvert
from placement.cluster import PlacementError, Plan
from placement.offer_plan import plan_offer

MAX_REPLICAS = 8


def plan_replicas(model_digest: str, adverts: Sequence[NodeAdvert], replicas: int, *,
                  context_tokens: int | None = None) -> tuple[Plan, ...]:
    """Up to `replicas` chains over disjoint nodes, best first; () when nobody offers the file.
    Raises PlacementError when not even one chain fits."""
    if not 1 <= replicas <= MAX_REPLICAS:
        raise ValueError(f"replicas must be between 1 and {MAX_REPLICAS}")
    first = plan_offer(model_digest, adverts, context_tokens=context_tokens)  # raises when nothing fits
    if first is None:
        return ()
    greedy = [first]
    while len(greedy) < replicas:
        used = {s.node for p in greedy for s in p.stages}
        more = _plan_or_none(model_digest, [a for a in adverts if a.node_id not in used], context_tokens)
        if more is None:
            break
        greedy.append(more)
    if len(greedy) == replicas:
        return tuple(greedy)
    dealt = _dealt(model_digest, adverts, replicas, context_tokens)
    return tuple(dealt) if len(dealt) > len(greedy) else tuple(greedy)


def _plan_or_none(model_digest: str, adverts: Sequence[NodeAdvert], context_tokens: int | None) -> Plan | None:
    try:
        return plan_offer(model_digest, adverts, context_tokens=context_tokens)
    except PlacementError:
        return None


def _dealt(model_digest: str, adverts: Sequence[NodeAdvert], replicas: int, context_tokens: int | None) -> list[Plan]:
    """The offering nodes dealt round-robin by free memory (largest first) into `replicas` groups, each
    planned alone; the groups that fit, best first."""
    offering = sorted((a for a in adverts if any(f.digest == model_digest for f in a.files)),
                      key=lambda a: (-a.resources.budget_free_bytes, a.node_id))
    plans = [p for i in range(replicas)
             if (p := _plan_or_none(model_digest, offering[i::replicas], context_tokens)) is not None]
    return sorted(plans, key=lambda p: p.time_per_token_ms)
