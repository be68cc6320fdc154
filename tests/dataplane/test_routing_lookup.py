"""Records mode in the router: an unknown model is looked up in the DHT and resolved once its holder's
advert arrives; nothing found is a 404 after the bounded wait; a failed attempt is retried once when
the lookup brings a holder not yet excluded (pure parts table-driven; the router with no processes)."""

from __future__ import annotations

import asyncio

import pytest
from routing_builders import OTHER, M, node

from core.errors import ModelNotFound, Unavailable
from dataplane.channels import PeerChannels
from dataplane.routing.lookup import SETTLE_S, has_holder, known
from dataplane.routing.resume import Served
from dataplane.routing.router import MeshRouter
from dataplane.routing.view import MeshView
from discovery.advert import NodeAdvert
from engine.local_models import LocalModels

ME = node("me", digest="")


@pytest.mark.parametrize(("peers", "name", "expected"), [
    ((), "m", False),
    ((node("h1"),), "m", True),
    ((node("h1"),), M, True),
    ((node("h1"),), M[:12], True),
    ((node("h1"),), "other", False),
    ((node("h1", start=0, end=10),), "m", False),  # one range alone chains into no model
])
def test_known(peers: tuple[NodeAdvert, ...], name: str, expected: bool) -> None:
    assert known(MeshView(ME, peers), name) is expected


@pytest.mark.parametrize(("peers", "exclude", "expected"), [
    ((), frozenset(), False),
    ((node("h1"),), frozenset(), True),
    ((node("h1"),), frozenset({"h1"}), False),
    ((node("h1"), node("h2")), frozenset({"h1"}), True),
    ((node("h1", digest=OTHER),), frozenset(), False),
    ((node("h1", start=0, end=10),), frozenset(), True),  # a range of it counts: a chain may form
])
def test_has_holder(peers: tuple[NodeAdvert, ...], exclude: frozenset[str], expected: bool) -> None:
    assert has_holder(MeshView(ME, peers), M, exclude) is expected


ANSWER_S = 0.2  # the DHT's adverts reach the table this long after a lookup
WAIT_S = 0.8  # the router's bounded wait: four times that, what a test that finds nothing sits through


def _router(peers: list[NodeAdvert], answers: dict[str, list[NodeAdvert]], asked: list[str]) -> MeshRouter:
    def lookup(name: str) -> None:  # the DHT: the holders' adverts reach the table a little later
        asked.append(name)
        asyncio.get_running_loop().call_later(ANSWER_S, lambda: peers.extend(answers.get(name, [])))

    return MeshRouter("me", LocalModels(), lambda: ME, lambda: list(peers), PeerChannels("t"), dict,
                      lookup=lookup, lookup_wait_s=WAIT_S)


def test_an_unknown_model_is_looked_up_and_resolved() -> None:
    peers: list[NodeAdvert] = []
    asked: list[str] = []
    router = _router(peers, {"m": [node("h1")]}, asked)
    view, target, _ = asyncio.run(router._find("m"))
    assert asked == ["m"] and target.digest == M and view.holding(M)[0].node_id == "h1"
    asyncio.run(router._find("m"))
    assert asked == ["m"]  # known now: no second lookup


def test_nothing_found_is_a_404_after_the_bounded_wait() -> None:
    asked: list[str] = []
    router = _router([], {}, asked)
    with pytest.raises(ModelNotFound, match=f"DHT within {WAIT_S:g} s"):
        asyncio.run(router._find("nowhere"))
    assert asked == ["nowhere"]


def test_without_lookup_an_unknown_model_is_a_404_at_once() -> None:
    router = MeshRouter("me", LocalModels(), lambda: ME, lambda: [], PeerChannels("t"), dict)
    with pytest.raises(ModelNotFound):
        asyncio.run(router._find("m"))


def _served(view: MeshView) -> Served:
    return Served(None, view.holding(M)[0].node_id)  # type: ignore[arg-type]


@pytest.mark.parametrize(("answers", "opened_on", "tries"), [
    ({M: [node("h2")]}, "h2", 2),  # the lookup found another holder: tried once more, on it
    ({}, None, 1),  # nothing new: the failure stands, with why
    ({M: [node("h1")]}, None, 1),  # only the excluded one again: not retried
])
def test_a_failure_is_retried_once_after_a_lookup(answers: dict, opened_on: str | None, tries: int) -> None:
    peers = [node("h1")]
    asked: list[str] = []
    router = _router(peers, answers, asked)
    calls: list[str] = []

    async def attempt(view: MeshView) -> Served:
        calls.append(",".join(a.node_id for a in view.holding(M)))
        fresh = [a for a in view.holding(M) if a.node_id != "h1"]
        if not fresh:
            raise Unavailable("h1 failed", code="holder_failed")
        return _served(MeshView(ME, tuple(fresh)))

    async def run() -> Served:
        return await router._or_looked_up(router.view(), M, {"h1"}, attempt)

    if opened_on is None:
        with pytest.raises(Unavailable, match="no other holder found in the DHT") as e:
            asyncio.run(run())
        assert e.value.code == "holder_failed"
    else:
        assert asyncio.run(run()).node_id == opened_on
    assert asked == [M] and len(calls) == tries


def test_one_bounded_wait_per_request() -> None:
    """A name looked up (its holder's advert arrives after ANSWER_S) whose holder then fails: the second
    lookup gets what is left of the request's wait, not a whole one more."""
    peers: list[NodeAdvert] = []
    asked: list[str] = []
    router = _router(peers, {"m": [node("h1")]}, asked)

    async def attempt(view: MeshView) -> Served:
        raise Unavailable("h1 failed", code="holder_failed")

    async def run() -> float:
        started = asyncio.get_running_loop().time()
        _, target, _ = await router._find("m")
        left_s = WAIT_S - (asyncio.get_running_loop().time() - started)
        with pytest.raises(Unavailable, match="no other holder found"):
            await router._or_looked_up(router.view(), target.digest, {"h1"}, attempt, left_s)
        return asyncio.get_running_loop().time() - started

    took_s = asyncio.run(run())
    assert asked == ["m", M]
    # the first wait: the answer, then SETTLE_S for the holder to learn us; the second: what is left
    # (nothing here), where it used to be WAIT_S more
    assert took_s < ANSWER_S + SETTLE_S + 0.3, took_s
