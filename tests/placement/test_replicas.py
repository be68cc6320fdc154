"""plan_replicas: N disjoint chains for an offered model when memory allows (issue 14, --replicas)."""

from __future__ import annotations

import pytest

from discovery.advert import Addresses, FileAdvert, Load, NodeAdvert, Resources
from placement.cluster import PlacementError
from placement.offer_plan import plan_offer
from placement.replicas import plan_replicas

D = "d" * 64
MIB = 1 << 20
# 30 layers of 1 MiB + KV 2048 x 64 B (128 KiB) each, 1 MiB embedding, 1 MiB head, plus the planner's
# buffers: about 37.5 MiB; two nodes of 30 MiB or one of 60 MiB hold it
FILE = FileAdvert(digest=D, alias="m", n_layers=30, layer_bytes=MIB, embed_bytes=MIB, head_bytes=MIB,
                  kv_bytes_per_token_per_layer=64, ctx=2048)


def offering(node_id: str, budget_mib: int, *, speed: float = 0.0, offers: bool = True) -> NodeAdvert:
    return NodeAdvert(node_id, f"n-{node_id}", "0", b"k" * 32, Addresses("h:1", f"{node_id}:2"), (),
                      Resources("cpu", 0, 0, 1 << 34, 1 << 34, speed, budget_mib * MIB), Load(0, 0, 4), 1, 0.0, 10.0,
                      files=(FILE,) if offers else ())


def nodes(*budgets_mib: int) -> list[NodeAdvert]:
    return [offering(f"n{i}", b) for i, b in enumerate(budgets_mib)]


@pytest.mark.parametrize(("budgets", "replicas", "chains"), [
    ((30, 30, 30, 30), 2, 2),  # each chain needs two nodes: two chains of two
    ((30, 30, 30), 2, 1),  # memory allows one chain only
    ((30, 30, 30, 30), 1, 1),
    ((60, 60), 3, 2),  # one node holds a chain: as many chains as nodes
    ((60, 60, 60), 3, 3),
    ((30, 30, 30, 30, 30, 30), 3, 3),
    ((30, 30, 18, 18), 2, 2),  # the best chain takes both big nodes; dealt big + small, two chains fit
])
def test_chains_are_disjoint_and_cover_the_model(budgets, replicas, chains):
    plans = plan_replicas(D, nodes(*budgets), replicas)
    assert len(plans) == chains
    used = [s.node for p in plans for s in p.stages]
    assert len(used) == len(set(used)), "a node in two chains"
    for p in plans:
        assert p.stages[0].start == 0 and p.stages[-1].end == 30
        assert all(a.end == b.start for a, b in zip(p.stages, p.stages[1:], strict=False))
    assert [p.time_per_token_ms for p in plans] == sorted(p.time_per_token_ms for p in plans) or chains == 1


def test_one_replica_is_the_plain_offer_plan():
    adverts = nodes(30, 30, 35)
    assert plan_replicas(D, adverts, 1) == (plan_offer(D, adverts),)


def test_the_first_chain_is_the_best_one():
    adverts = [offering("slow1", 60, speed=5.0), offering("fast", 60, speed=100.0), offering("slow2", 60, speed=5.0)]
    plans = plan_replicas(D, adverts, 2)
    assert [s.node for s in plans[0].stages] == ["fast"] and len(plans) == 2


def test_nobody_offering_is_no_plan_and_too_little_memory_raises():
    assert plan_replicas(D, [offering("x", 60, offers=False)], 2) == ()
    with pytest.raises(PlacementError):
        plan_replicas(D, nodes(5, 5), 2)


@pytest.mark.parametrize("replicas", [0, 9])
def test_replicas_out_of_range_is_refused(replicas):
    with pytest.raises(ValueError):
        plan_replicas(D, nodes(60), replicas)


def test_the_same_adverts_give_the_same_chains():
    adverts = nodes(30, 32, 31, 30, 33)
    assert plan_replicas(D, adverts, 2) == plan_replicas(D, adverts, 2)
