"""Table-driven tests of the catalog read from one view of the mesh, and of model resolution."""

from __future__ import annotations

import pytest
from routing_builders import OTHER, M, node, offer

from dataplane.routing.view import MeshView, list_models, resolve

CASES = [
    # (name, me, peers, expected [(alias, nodes)])
    ("held whole here", node("s"), [], [("m", ("name-s",))]),
    ("held whole by two", node("s"), [node("p")], [("m", ("name-s", "name-p"))]),
    ("a chain of ranges", node("s", digest=""), [node("a", end=10), node("b", start=10)],
     [("m", ("name-a", "name-b"))]),
    ("ranges with a gap are no model", node("s", digest=""), [node("a", end=10), node("b", start=12)], []),
    ("only offered: listed with no nodes", node("s", digest="", files=(offer(),)), [], [("big", ())]),
    ("offered and held: held wins", node("s", digest=OTHER, alias="big", files=(offer(),)), [],
     [("big", ("name-s",))]),
]


@pytest.mark.parametrize(("name", "me", "peers", "expected"), CASES, ids=[c[0] for c in CASES])
def test_list_models(name, me, peers, expected):
    listings = list_models(MeshView(me, tuple(peers)))
    assert [(m.alias, m.nodes) for m in listings] == expected


RESOLVE = [
    ("alias", "m", M),
    ("full digest", M, M),
    ("12-char digest prefix", M[:12], M),
    ("short prefix is no match", M[:8], None),
    ("unknown", "nope", None),
]


@pytest.mark.parametrize(("name", "asked", "digest"), RESOLVE, ids=[c[0] for c in RESOLVE])
def test_resolve(name, asked, digest):
    target = resolve(list_models(MeshView(node("s"), ())), asked)
    assert (target.digest if target else None) == digest


def test_view_finds_adverts_by_node_id_and_prefers_our_own():
    me = node("s")
    view = MeshView(me, (node("p"), node("s", active=3)))
    assert view.advert("s") is me
    assert view.advert("p").name == "name-p"
    assert view.advert("gone") is None
