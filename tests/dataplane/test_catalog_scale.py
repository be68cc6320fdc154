"""Finding 4 of issue 11: the catalog is computed once per set of adverts, so 400 members advertising
64 partial models each cannot freeze the event loop on every /v1/models, chat or /health."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from routing_builders import M, node

from dataplane.channels import PeerChannels
from dataplane.routing.router import MeshRouter
from dataplane.routing.view import MeshView, build_catalog
from discovery.advert import ModelAdvert
from engine.local_models import LocalModels

N_FAKES, N_MODELS = 400, 64


def fake(i: int):
    base = node(f"{i:032x}", digest="")
    models = tuple(ModelAdvert(f"{(i * N_MODELS + k) % 97:064x}", f"fake{k}", 30, k % 29, k % 29 + 1, "torch", 2048)
                   for k in range(N_MODELS))
    return replace(base, models=models)


def router(peers):
    me = node("me")
    return MeshRouter("me", LocalModels(), lambda: me, lambda: peers, PeerChannels("t"), dict)


def test_catalog_of_400_members_with_64_partial_models_each_is_fast():
    peers = [fake(i) for i in range(N_FAKES)]
    started = time.perf_counter()
    catalog = build_catalog([node("me"), *peers])
    assert time.perf_counter() - started < 1.0
    assert [m.alias for m in catalog.listings] == ["m"]  # partial ranges never chain into a model


def test_list_models_and_resolve_reuse_the_catalog_until_an_advert_changes():
    peers = [fake(i) for i in range(N_FAKES)]
    r = router(peers)
    r.list_models()  # the one build
    started = time.perf_counter()
    for _ in range(50):
        assert [m.alias for m in r.list_models()] == ["m"]
        view = r.view()
        assert [a.node_id for a in view.holding(M)] == ["me"]
    per_request_s = (time.perf_counter() - started) / 50
    assert per_request_s < 0.02, f"{per_request_s * 1000:.1f} ms per request"
    first = r.view().catalog
    assert r.view().catalog is first
    peers[0] = replace(node(f"{0:032x}"), seq=2)  # its next advert (holds M whole): the catalog follows
    assert r.view().catalog is not first
    assert r.list_models()[0].nodes == ("name-me", f"name-{0:032x}")


def test_routing_a_request_among_many_fakes_stays_fast():
    peers = [fake(i) for i in range(N_FAKES)]
    r = router(peers)
    r.list_models()

    async def resolve_many() -> float:
        started = time.perf_counter()
        for _ in range(50):
            view = r.view()
            r._resolve(view, "m")
        return (time.perf_counter() - started) / 50

    assert asyncio.run(resolve_many()) < 0.02


def test_a_view_without_a_router_builds_its_own_catalog():
    view = MeshView(node("me"), (node("p"),))
    assert [m.nodes for m in view.catalog.listings] == [("name-me", "name-p")]
