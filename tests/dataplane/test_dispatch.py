"""Dispatch under the retry policy, on fake holders: which nodes are tried, what the client gets."""

from __future__ import annotations

import asyncio

import pytest
from routing_builders import M, node

from core.errors import BadRequest, Busy, MeshError, Unavailable
from dataplane.channels import PeerChannels
from dataplane.routing.dispatch import Dispatcher
from dataplane.routing.retry import Attempts
from dataplane.routing.view import MeshView, Target
from engine.local_models import LocalModels

TARGET = Target(M, "m", 2048)

CASES = [
    # (name, peers' loads (active of 8; 2 apart, beyond the prefix-affinity slack), errors by node id, expected tried, expected result or error type)
    ("least loaded answers", {"a": 2, "b": 0}, {}, ["b"], "b"),
    ("failed holder: next one", {"a": 0, "b": 2}, {"a": Unavailable("down")}, ["a", "b"], "b"),
    ("busy holder: next one", {"a": 0, "b": 2}, {"a": Busy(3)}, ["a", "b"], "b"),
    ("bad request is final", {"a": 0, "b": 2}, {"a": BadRequest("no")}, ["a"], BadRequest),
    ("all failed: unavailable", {"a": 0, "b": 2}, {"a": Unavailable("x"), "b": Unavailable("y")}, ["a", "b"],
     Unavailable),
    ("all busy: busy", {"a": 0, "b": 2}, {"a": Busy(2), "b": Busy(5)}, ["a", "b"], Busy),
    ("at most three tries", {"a": 0, "b": 2, "c": 4, "d": 6},
     {k: Unavailable(k) for k in "abcd"}, ["a", "b", "c"], Unavailable),
]


@pytest.mark.parametrize(("name", "loads", "errors", "tried", "expected"), CASES, ids=[c[0] for c in CASES])
def test_first_holder(name, loads, errors, tried, expected):
    view = MeshView(node("me", digest=""), tuple(node(n, active=a, capacity=8) for n, a in loads.items()))
    dispatcher = Dispatcher(LocalModels(), PeerChannels("t"), clock=lambda: 100.0)
    calls: list[str] = []

    async def open_on(advert):
        calls.append(advert.node_id)
        if advert.node_id in errors:
            raise errors[advert.node_id]
        return advert.node_id

    async def run():
        return await dispatcher.first_holder(view, TARGET, "k", Attempts(), open_on)

    if isinstance(expected, type) and issubclass(expected, MeshError):
        with pytest.raises(expected):
            asyncio.run(run())
    else:
        assert asyncio.run(run()) == expected
    assert calls == tried
    failed = [n for n in tried if isinstance(errors.get(n), Unavailable)]
    assert sorted(dispatcher.failures) == sorted(failed)  # failures keyed by node id, not by name


def test_nobody_holds_it_whole():
    view = MeshView(node("me", digest=""), (node("a", end=10),))
    dispatcher = Dispatcher(LocalModels(), PeerChannels("t"), clock=lambda: 100.0)

    async def open_on(advert):
        raise AssertionError("no whole holder to open")

    assert asyncio.run(dispatcher.first_holder(view, TARGET, "k", Attempts(), open_on)) is None
