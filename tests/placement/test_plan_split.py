"""plan_split: table-driven cases built from tiny cluster builders."""

from __future__ import annotations

import pytest

from placement.cluster import Cluster, Link, Links, ModelSpec, NodeSpec, PlacementError
from placement.plan import plan_split

GB = 10**9
# 10 layers of 1 GB, small embed/head, no KV cache unless a case asks for it.
MODEL = ModelSpec(n_layers=10, layer_bytes=GB, embed_bytes=GB // 10, head_bytes=GB // 10,
                  kv_bytes_per_token_per_layer=0, activation_bytes_per_token=8192)
LAN = Link(0.5, 125_000_000)


def node(nid: str, mem_gb: float, layer_ms: float = 1.0, overhead_ms: float = 0.2) -> NodeSpec:
    return NodeSpec(nid, int(mem_gb * GB), layer_ms, overhead_ms)


def cluster(*nodes: NodeSpec, pairs: dict | None = None, concurrency: int = 1, model: ModelSpec = MODEL,
            context: int = 4096) -> Cluster:
    return Cluster(model, nodes, Links(LAN, pairs or {}), context_tokens=context, concurrency=concurrency)


def used(c: Cluster) -> list[str]:
    return [s.node for s in plan_split(c).stages]


CASES = [
    # (name, cluster, expected nodes in chain order or as a set)
    ("fits on one node: no hop is worth it", cluster(node("big", 20), node("other", 20, 1.0)), {"big"}),
    ("must split: no node holds it alone", cluster(node("a", 6), node("b", 6)), {"a", "b"}),
    ("slow tiny node is left out", cluster(node("a", 8), node("b", 8), node("tiny", 1.2, layer_ms=20)), {"a", "b"}),
    ("far node not worth it over a slow link",
     cluster(node("a", 11), node("far", 6, layer_ms=0.5), pairs={("a", "far"): Link(40.0, 1_000_000)}), {"a"}),
    ("the same node is worth it over the LAN", cluster(node("a", 11), node("far", 6, layer_ms=0.5)), {"a", "far"}),
    ("faster node wins even when both fit", cluster(node("slow", 20, 2.0), node("fast", 20, 1.0)), {"fast"}),
]


@pytest.mark.parametrize("name,c,expected", CASES, ids=[c[0] for c in CASES])
def test_plan_split_chooses_nodes(name: str, c: Cluster, expected: set[str]) -> None:
    assert set(used(c)) == expected


def test_plan_covers_layers_contiguously_and_fits_memory() -> None:
    c = cluster(node("a", 4), node("b", 4), node("c", 4))
    plan = plan_split(c)
    assert plan.stages[0].start == 0 and plan.stages[-1].end == MODEL.n_layers
    assert all(x.end == y.start for x, y in zip(plan.stages, plan.stages[1:], strict=False))
    for s in plan.stages:
        mem = c.node(s.node).memory_bytes
        need = s.n_layers * c.per_layer_bytes + (MODEL.embed_bytes if s.start == 0 else 0) \
            + (MODEL.head_bytes if s.end == MODEL.n_layers else 0)
        assert need <= mem


def test_split_puts_more_layers_on_the_faster_node() -> None:
    plan = plan_split(cluster(node("fast", 8, 0.5), node("slow", 8, 2.0)))
    sizes = {s.node: s.n_layers for s in plan.stages}
    assert sizes["fast"] > sizes["slow"]


def test_nothing_fits_says_by_how_much() -> None:
    c = cluster(node("a", 3), node("b", 3))
    with pytest.raises(PlacementError) as err:
        plan_split(c)
    assert err.value.shortfall_bytes >= 4 * GB
    assert "short by" in str(err.value) and str(err.value.shortfall_bytes) in str(err.value)


def test_kv_cache_counts_against_memory() -> None:
    kv_model = ModelSpec(10, GB, 0, 0, kv_bytes_per_token_per_layer=100_000, activation_bytes_per_token=8192)
    # 10 layers x (1 GB + 0.4 GB of KV at 4096 tokens) = 14 GB: 12 GB is not enough alone.
    assert set(used(cluster(node("a", 12), node("b", 12), model=kv_model))) == {"a", "b"}
    assert used(cluster(node("a", 15), node("b", 12), model=kv_model)) == ["a"]


def test_concurrency_changes_the_answer() -> None:
    nodes = (node("a", 20, 1.0), node("b", 20, 1.0), node("c", 20, 1.0))
    one = plan_split(cluster(*nodes, concurrency=1))
    many = plan_split(cluster(*nodes, concurrency=8))
    assert len(one.stages) == 1  # one stream: hops only add latency
    assert len(many.stages) == 3  # many streams: the slowest stage sets the pace, so spread out
    assert many.bottleneck_ms < one.bottleneck_ms


def test_deterministic_and_pure() -> None:
    c = cluster(*(node(f"n{i}", 3 + i % 4, 0.5 + (i % 3) / 2) for i in range(12)))
    assert plan_split(c) == plan_split(c)


@pytest.mark.parametrize("n", [64, 300])
def test_large_clusters_plan_quickly_and_validly(n: int) -> None:
    c = cluster(*(node(f"n{i:03d}", 1.5 + (i * 7) % 9, 0.4 + (i * 13) % 10 / 5) for i in range(n)), concurrency=4)
    plan = plan_split(c)
    assert plan.stages[-1].end == MODEL.n_layers
