"""Planning the load of a model nobody serves yet, from the nodes that offer its GGUF: pure.

The offered file's byte figures (from the node that has it) make the planner's ModelSpec; each
candidate node brings its free memory budget and its measured speed. Candidates are the nodes holding
bytes of the file and every node with a free `--memory-budget` (it fetches its range from the holders,
docs/weights.md). A plan over the holders alone is compared with one over every candidate by
time per token over `HORIZON_TOKENS` tokens plus the time to fetch the bytes the plan's nodes lack
(at `LINK_BYTES_PER_S`, nodes fetching in parallel), so holders win unless fetching pays off.
"""

from __future__ import annotations

from collections.abc import Sequence

from discovery.advert import FileAdvert, NodeAdvert
from placement.cluster import Cluster, ModelSpec, NodeSpec, PlacementError, Plan
from placement.plan import plan_split
from placement.speed import ms_per_layer

DEFAULT_LAYER_MS = 1.0  # nodes that have not measured a speed are taken as equal
OVERHEAD_MS = 0.3
LINK_BYTES_PER_S = 125_000_000  # 1 Gbit/s: what a fetch is assumed to run at
HORIZON_TOKENS = 2_000  # tokens over which a faster plan must repay the bytes it fetches


def buffer_reserve(file: FileAdvert) -> int:
    """What a stage holds beside weights and KV (shard/memory.py `other_bytes`): RoPE tables of the
    context (taken at a head size of 128, the largest common one) and a step's logits, about 1 MiB."""
    return 2 * 2 * file.ctx * 128 * 4 + (1 << 20)


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
        if not any(f.digest == model_digest for f in advert.files) and advert.resources.budget_free_bytes <= 0:
            continue  # neither holds bytes of the file nor has a budget to take a range into
        r = advert.resources
        memory = min(r.budget_free_bytes or r.ram_free_bytes, r.ram_free_bytes) - buffer_reserve(file)
        nodes.append(NodeSpec(id=advert.node_id, memory_bytes=max(0, memory),
                              layer_time_ms=ms_per_layer(r.speed_tok_s, file.n_layers, DEFAULT_LAYER_MS),
                              overhead_ms=OVERHEAD_MS))
    if not nodes:
        return None
    return Cluster(model=model, nodes=tuple(nodes), context_tokens=context_tokens, concurrency=1)


def plan_offer(
    model_digest: str, adverts: Sequence[NodeAdvert], *, context_tokens: int | None = None
) -> Plan | None:
    """The split to load, or None when nobody offers the file; raises PlacementError when it does not fit.

    Two candidates: the nodes holding bytes of the file, and every node that may take a range; the
    cheaper by `plan_cost` wins."""
    holders = [a for a in adverts if any(f.digest == model_digest for f in a.files)]
    best: tuple[float, Plan] | None = None
    error: PlacementError | None = None
    groups = [holders] if len(holders) == len(adverts) else [holders, list(adverts)]
    for group in groups:
        cluster = cluster_for_offer(model_digest, group, context_tokens=context_tokens)
        if cluster is None:
            continue
        try:
            plan = plan_split(cluster)
        except PlacementError as e:
            error = e
            continue
        cost = plan_cost(plan, model_digest, adverts)
        if best is None or cost < best[0]:
            best = (cost, plan)
    if best is None:
        if error is not None:
            raise error
        return None
    return best[1]


def plan_cost(plan: Plan, model_digest: str, adverts: Sequence[NodeAdvert]) -> float:
    """Milliseconds: time per token over HORIZON_TOKENS, plus the slowest node's fetch of what it lacks."""
    return plan.time_per_token_ms * HORIZON_TOKENS + max(
        (1000.0 * b / LINK_BYTES_PER_S for b in missing_bytes(plan, model_digest, adverts)), default=0.0)


def missing_bytes(plan: Plan, model_digest: str, adverts: Sequence[NodeAdvert]) -> list[int]:
    """Per stage: the bytes of its range its node does not hold yet (from the file's byte figures)."""
    file = offered_file(model_digest, adverts)
    if file is None:
        return []
    by_id = {a.node_id: a for a in adverts}
    out = []
    for s in plan.stages:
        advert = by_id.get(s.node)
        held = next((f for f in advert.files if f.digest == model_digest), None) if advert else None
        start, end = (held.start, held.held_end) if held is not None else (0, 0)
        missing_layers = (s.end - s.start) - max(0, min(s.end, end) - max(s.start, start))
        need = missing_layers * file.layer_bytes
        if s.start == 0 and start != 0 or s.start == 0 and held is None:
            need += file.embed_bytes
        if s.end == file.n_layers and end != file.n_layers:
            need += file.head_bytes
        out.append(need)
    return out
