"""Build the planner's `Cluster` from what peers advertise.

An advert carries free memory and one speed figure, `speed_tok_s`. We read that figure as the
decode rate on a reference model reading `bytes_per_speed_token` bytes per token, so a node's
achieved bandwidth is `speed_tok_s * bytes_per_speed_token` and a layer of this model costs
`layer_bytes / bandwidth` (decode is bandwidth bound). The caller says what the reference is,
because that is the node daemon's measuring convention, not the planner's.
"""

from __future__ import annotations

from collections.abc import Sequence

from discovery.advert import NodeAdvert
from placement.cluster import Cluster, Links, ModelSpec, NodeSpec

DEFAULT_OVERHEAD_MS = 0.3


def usable_memory_bytes(advert: NodeAdvert) -> int:
    """GPU nodes run the model from VRAM; CPU and unified-memory nodes from RAM."""
    r = advert.resources
    return r.vram_free_bytes if r.vram_total_bytes > 0 else r.ram_free_bytes


def node_spec_from_advert(advert: NodeAdvert, model: ModelSpec, *, bytes_per_speed_token: float,
                          overhead_ms: float = DEFAULT_OVERHEAD_MS, site: str = "") -> NodeSpec | None:
    """The node as the planner sees it, or None when it has no speed figure yet."""
    if advert.resources.speed_tok_s <= 0 or bytes_per_speed_token <= 0:
        return None
    bandwidth = advert.resources.speed_tok_s * bytes_per_speed_token
    r = advert.resources
    return NodeSpec(
        id=advert.node_id,
        memory_bytes=max(0, usable_memory_bytes(advert)),
        layer_time_ms=model.layer_bytes * 1000.0 / bandwidth,
        overhead_ms=overhead_ms,
        total_memory_bytes=max(r.vram_total_bytes if r.vram_total_bytes > 0 else r.ram_total_bytes, 0),
        site=site,
    )


def cluster_from_adverts(model: ModelSpec, adverts: Sequence[NodeAdvert], *, bytes_per_speed_token: float,
                         links: Links | None = None, context_tokens: int = 4096, concurrency: int = 1,
                         sites: dict[str, str] | None = None) -> Cluster:
    sites = sites or {}
    nodes = []
    for a in adverts:
        spec = node_spec_from_advert(a, model, bytes_per_speed_token=bytes_per_speed_token,
                                     site=sites.get(a.node_id, ""))
        if spec is not None:
            nodes.append(spec)
    return Cluster(model=model, nodes=tuple(nodes), links=links or Links(),
                   context_tokens=context_tokens, concurrency=concurrency)
