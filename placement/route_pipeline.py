"""Which chain of layer-range holders serves a model no single node holds: pure, shortest path.

States are layer boundaries 0..n_layers; a node holding [s, e) is an edge s -> e costing its compute
for e - s layers (from its advertised speed) plus one hop, plus a penalty for its queue. Dijkstra
from 0 to n_layers gives the chain with the least estimated time per token.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from discovery.advert import ModelAdvert, NodeAdvert
from placement.cluster import Stage
from placement.speed import ms_per_layer

HOP_MS = 1.0  # per hop on a LAN: gRPC + serialisation of one token's activation
UNKNOWN_LAYER_MS = 2.0  # a node that has not measured its speed yet
LOAD_PENALTY_MS = 5.0  # per request already active or queued on the node


@dataclass(frozen=True, slots=True)
class PipelineRoute:
    stages: tuple[Stage, ...]  # the one "layers [start, end) on a node" type, as in plans and on the wire
    est_ms_per_token: float


def layer_ms(advert: NodeAdvert, n_layers: int) -> float:
    """Per-layer decode time from the node's measured whole-stage speed (tokens/s over its layers)."""
    return ms_per_layer(advert.resources.speed_tok_s, n_layers, UNKNOWN_LAYER_MS)


def route_pipeline(
    model_digest: str, adverts: Sequence[NodeAdvert], *, exclude: frozenset[str] = frozenset(), with_load: bool = True,
    streams: Mapping[str, int] | None = None,
) -> PipelineRoute | None:
    """The cheapest chain covering [0, n_layers), or None. `exclude` drops nodes (e.g. failed ones);
    `with_load=False` ignores queues (whether a chain exists at all, as the catalog asks); `streams`: the
    caller's own open streams per node, a floor under the advertised load (adverts lag a burst)."""
    held = [(a, m) for a in adverts if a.node_id not in exclude for m in a.models if m.digest == model_digest]
    return route_over(held, with_load=with_load, streams=streams)


def held_by_digest(adverts: Sequence[NodeAdvert]) -> dict[str, list[tuple[NodeAdvert, ModelAdvert]]]:
    """Every held range, grouped by model digest, in one pass over the adverts."""
    out: dict[str, list[tuple[NodeAdvert, ModelAdvert]]] = {}
    for advert in adverts:
        for m in advert.models:
            out.setdefault(m.digest, []).append((advert, m))
    return out


def route_over(held: Sequence[tuple[NodeAdvert, ModelAdvert]], *, with_load: bool = True,
               streams: Mapping[str, int] | None = None) -> PipelineRoute | None:
    """The cheapest chain over these held ranges of one model (Dijkstra over layer boundaries)."""
    edges: dict[int, list[tuple[int, float, str]]] = {}
    n_layers = 0
    for advert, m in held:
        n_layers = m.n_layers
        if not 0 <= m.start < m.end <= m.n_layers:
            continue  # a range that cannot be part of a chain of this model
        busy = max(advert.load.active + advert.load.queued, (streams or {}).get(advert.node_id, 0)) if with_load else 0
        if with_load and advert.load.capacity > 0 and busy >= advert.load.capacity:
            continue
        held_layers = m.end - m.start
        cost = layer_ms(advert, held_layers) * held_layers + HOP_MS + LOAD_PENALTY_MS * busy
        edges.setdefault(m.start, []).append((m.end, cost, advert.node_id))
    if n_layers == 0:
        return None
    best: dict[int, float] = {0: 0.0}
    back: dict[int, tuple[int, str]] = {}
    heap = [(0.0, 0)]
    while heap:
        cost, at = heapq.heappop(heap)
        if at == n_layers:
            break
        if cost > best.get(at, float("inf")):
            continue
        for end, edge_cost, node_id in sorted(edges.get(at, ())):
            new = cost + edge_cost
            if new < best.get(end, float("inf")):
                best[end] = new
                back[end] = (at, node_id)
                heapq.heappush(heap, (new, end))
    if n_layers not in back:
        return None
    stages = []
    at = n_layers
    while at > 0:
        start, node_id = back[at]
        stages.append(Stage(node_id, start, at))
        at = start
    return PipelineRoute(tuple(reversed(stages)), best[n_layers])
