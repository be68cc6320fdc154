"""Table-driven tests of the pure holder ranking."""

from __future__ import annotations

import pytest

from discovery.advert import Addresses, Load, ModelAdvert, NodeAdvert, Resources
from placement.choose_holder import FailureRecord, choose_holder, rank_holders

M = "a" * 64
OTHER = "b" * 64


def node(node_id: str, *, active: int = 0, queued: int = 0, capacity: int = 4, digest: str = M,
         whole: bool = True) -> NodeAdvert:
    models = (ModelAdvert(digest, "m", 30, 0, 30 if whole else 10, "llama.cpp", 2048),) if digest else ()
    return NodeAdvert(node_id, node_id, "0", b"k" * 32, Addresses("h:1", "h:2"), models,
                      Resources("cpu", 0, 0, 1, 1, 0.0), Load(active, queued, capacity), 1, 0.0, 10.0)


CASES = [
    # (name, self, peers, failures, inflight, expected ranking)
    ("self first when equal", node("s"), [node("p")], {}, {}, ("s", "p")),
    ("self with a free slot first, even when peers are idler", node("s", active=3), [node("p"), node("q")], {}, {},
     ("s", "p", "q")),
    ("three idle claimants never outrank self", node("s", active=1, capacity=2),
     [node("f1"), node("f2"), node("f3")], {}, {}, ("s", "f1", "f2", "f3")),
    ("self full: peers only", node("s", active=4), [node("p", active=1)], {}, {}, ("p",)),
    ("least loaded peer wins", None, [node("a", active=2), node("p", active=1)], {}, {}, ("p", "a")),
    ("queued counts as load", None, [node("a", active=1, queued=2), node("b", active=2)], {}, {}, ("b", "a")),
    ("capacity scales load", None, [node("a", active=2, capacity=8), node("b", active=1, capacity=2)], {}, {}, ("a", "b")),
    ("our in-flight sends count", None, [node("a"), node("b")], {}, {"a": 2}, ("b", "a")),
    ("recent failure backs off", None, [node("a"), node("b", active=1)], {"a": FailureRecord(1, 99.5)}, {}, ("b", "a")),
    ("old failure forgiven", None, [node("a"), node("b", active=1)], {"a": FailureRecord(1, 90.0)}, {}, ("a", "b")),
    ("other model ignored", None, [node("a", digest=OTHER), node("b")], {}, {}, ("b",)),
    ("layer range is not a holder", None, [node("a", whole=False), node("b")], {}, {}, ("b",)),
    ("no model at all", node("s", digest=""), [], {}, {}, ()),
]


@pytest.mark.parametrize(("name", "me", "peers", "failures", "inflight", "expected"), CASES, ids=[c[0] for c in CASES])
def test_rank_holders(name, me, peers, failures, inflight, expected):
    ranking = rank_holders(M, peers, me, 100.0, failures, inflight=inflight)
    assert ranking.ranked == expected


def test_saturated_holders_are_reported_not_ranked():
    ranking = rank_holders(M, [node("a", active=1, queued=3), node("b", active=4)], None, 0.0, {})
    assert ranking.ranked == () and ranking.saturated == ("a", "b") and ranking.any_holder
    assert choose_holder(M, [node("a", active=4)], None, 0.0, {}) is None


def test_backoff_grows_with_repeated_failures():
    peers = [node("a"), node("b", active=1)]
    assert rank_holders(M, peers, None, 103.0, {"a": FailureRecord(3, 100.0)}).ranked[0] == "b"  # 4 s backoff
    assert rank_holders(M, peers, None, 103.0, {"a": FailureRecord(1, 100.0)}).ranked[0] == "a"  # 1 s backoff


def test_prefix_affinity_is_stable_and_spreads_conversations():
    peers = [node(f"n{i}") for i in range(4)]
    picks = {choose_holder(M, peers, None, 0.0, {}, prefix_key=f"conv{i}") for i in range(40)}
    assert len(picks) >= 3  # different conversations land on different holders
    for i in range(10):
        key = f"conv{i}"
        assert choose_holder(M, peers, None, 0.0, {}, prefix_key=key) == choose_holder(
            M, list(reversed(peers)), None, 0.0, {}, prefix_key=key)


def test_prefix_affinity_yields_to_a_much_less_loaded_holder():
    key = next(k for k in (f"c{i}" for i in range(100))
               if choose_holder(M, [node("a"), node("b")], None, 0.0, {}, prefix_key=k) == "a")
    assert choose_holder(M, [node("a", active=3), node("b")], None, 0.0, {}, prefix_key=key) == "b"
    assert choose_holder(M, [node("a", active=1), node("b")], None, 0.0, {}, prefix_key=key) == "a"


def test_self_with_a_free_slot_beats_prefix_affinity():
    peers = [node(f"n{i}") for i in range(4)]
    for i in range(20):
        assert choose_holder(M, peers, node("s", active=2), 0.0, {}, prefix_key=f"conv{i}") == "s"
