"""replan: after a join or a leave, fewest moved layers at (near) best objective."""

from __future__ import annotations

import dataclasses

import pytest

from placement.cluster import Cluster, Link, Links, ModelSpec, NodeSpec
from placement.plan import plan_split
from placement.replan import moved_layers, replan

GB = 10**9
MODEL = ModelSpec(20, GB, GB // 10, GB // 10, 0, 8192)


def node(nid: str, mem_gb: float, layer_ms: float = 1.0) -> NodeSpec:
    return NodeSpec(nid, int(mem_gb * GB), layer_ms, 0.2)


def cluster(*nodes: NodeSpec, concurrency: int = 1) -> Cluster:
    return Cluster(MODEL, nodes, Links(Link(0.5, 125_000_000)), concurrency=concurrency)


BASE = (node("a", 8), node("b", 8), node("c", 8))

CASES = [
    # (name, old cluster, new cluster, max moved layers)
    ("an idle node joins: nothing moves", cluster(*BASE), cluster(*BASE, node("d", 8, 1.0)), 0),
    ("a node leaves: only its layers move", cluster(*BASE, node("d", 8)), cluster(*BASE), 8),
    ("same cluster: nothing moves", cluster(*BASE), cluster(*BASE), 0),
]


@pytest.mark.parametrize("name,old,new,max_moved", CASES, ids=[c[0] for c in CASES])
def test_replan_moves_few_layers(name: str, old: Cluster, new: Cluster, max_moved: int) -> None:
    before = plan_split(old)
    after = replan(before, new)
    fresh = plan_split(new)
    assert moved_layers(before, after) <= max_moved
    assert after.objective_ms <= fresh.objective_ms * 1.02 + 1e-9
    assert after.stages[-1].end == MODEL.n_layers


def test_replan_never_uses_a_departed_node() -> None:
    old = cluster(*BASE, node("d", 8))
    before = plan_split(old)
    gone = before.stages[0].node
    new = dataclasses.replace(old, nodes=tuple(n for n in old.nodes if n.id != gone))
    assert gone not in {s.node for s in replan(before, new).stages}


def test_zero_tolerance_matches_the_fresh_objective() -> None:
    old = cluster(*BASE)
    new = cluster(*BASE, node("fast", 30, 0.3))
    after = replan(plan_split(old), new, tolerance=0.0)
    assert after.objective_ms == pytest.approx(plan_split(new).objective_ms)
