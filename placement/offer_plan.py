"""Planning the load of a model nobody serves yet, from the nodes that offer its GGUF: pure.

The offered file's byte figures (from the node that has it) make the planner's ModelSpec; each
offering node brings its free memory budget and its measured speed.
"""

from __future__ import annotations

from collections.abc import Sequence

from discovery.advert import FileAdvert, NodeAdvert
from placement.cluster import Cluster, ModelSpec, NodeSpec, Plan
from placement.plan import plan_split
from placement.speed import ms_per_layer

DEFAULT_LAYER_MS = 1.0  # nodes that have not measured a speed are taken as equal
OVERHEAD_MS = 0.3


def offered_file(model_digest: str, adverts: Sequence[NodeAdvert]) -> FileAdvert | None:
    return next((f for a in adverts for f in a.files if f.digest == model_digest), None)


def cluster_for_offer(
    model_digest: str, adverts: Sequence[NodeAdvert], *, context_tokens: int | None = None, hidden_bytes: int = 0
) -> Cluster | None:
    """`context_tokens`: KV tokens a stage reserves; None takes the offering nodes' own figure (each
    advertises its context x KV slots as `FileAdvert.ctx`), the largest when they differ."""
    file = offered_file(model_digest, adverts)
    if file is None:
        return None
    if context_tokens is None:
        context_tokens = max(f.ctx for a in adverts for f in a.files if f.digest == model_digest)
    model = ModelSpec(
        n_layers=file.n_layers,
        layer_bytes=file.layer_bytes,
        embed_bytes=file.embed_bytes,
        head_bytes=file.head_bytes,
        kv_bytes_per_token_per_layer=file.kv_bytes_per_token_per_layer,
        activation_bytes_per_token=hidden_bytes,
    )
    nodes = []
    for advert in adverts:
        if not any(f.digest == model_digest for f in advert.files):
            continue
        r = advert.resources
        memory = min(r.budget_free_bytes or r.ram_free_bytes, r.ram_free_bytes)
        nodes.append(NodeSpec(id=advert.node_id, memory_bytes=max(0, memory),
                              layer_time_ms=ms_per_layer(r.speed_tok_s, file.n_layers, DEFAULT_LAYER_MS),
                              overhead_ms=OVERHEAD_MS))
    if not nodes:
        return None
    return Cluster(model=model, nodes=tuple(nodes), context_tokens=context_tokens, concurrency=1)


def plan_offer(
    model_digest: str, adverts: Sequence[NodeAdvert], *, context_tokens: int | None = None
) -> Plan | None:
    """The split to load, or None when nobody offers the file; raises PlacementError when it does not fit."""
    cluster = cluster_for_offer(model_digest, adverts, context_tokens=context_tokens)
    return plan_split(cluster) if cluster is not None else None
