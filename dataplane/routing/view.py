"""One consistent view of the mesh per request, and the catalog read from it (pure).

A request takes one `MeshView`: our own advert, built once, and one snapshot of the peers' adverts.
Everything it decides (which models exist, who holds them whole, which chains of ranges cover them)
is read from that view.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.serving import ModelListing
from discovery.advert import NodeAdvert
from placement.route_pipeline import route_pipeline


@dataclass(frozen=True, slots=True)
class MeshView:
    me: NodeAdvert
    peers: tuple[NodeAdvert, ...]
    _by_id: dict[str, NodeAdvert] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_id = {a.node_id: a for a in self.peers}
        by_id[self.me.node_id] = self.me
        object.__setattr__(self, "_by_id", by_id)

    @property
    def adverts(self) -> list[NodeAdvert]:
        return [self.me, *self.peers]

    def advert(self, node_id: str) -> NodeAdvert | None:
        return self._by_id.get(node_id)


@dataclass(frozen=True, slots=True)
class Target:
    """The model a request asked for, once resolved."""

    digest: str
    alias: str
    context_length: int


def list_models(view: MeshView) -> list[ModelListing]:
    """Models held whole somewhere, models whose layer ranges chain into a full pipeline, and models
    only offered (loaded on the first request)."""
    adverts = view.adverts
    by_digest: dict[str, tuple[Target, int, list[str]]] = {}
    for advert in adverts:
        for m in advert.models:
            _, _, whole = by_digest.setdefault(m.digest, (Target(m.digest, m.alias, m.ctx), m.n_layers, []))
            if m.whole:
                whole.append(advert.name)
    listings = []
    for target, n_layers, whole in sorted(by_digest.values(), key=lambda v: v[0].alias):
        if whole:
            listings.append(ModelListing(target.alias, target.digest, n_layers, target.context_length, tuple(whole)))
        elif (route := route_pipeline(target.digest, adverts)) is not None:
            names = {a.node_id: a.name for a in adverts}
            chain = tuple(names[s.node_id] for s in route.stages)
            listings.append(ModelListing(target.alias, target.digest, n_layers, target.context_length, chain))
    offered: dict[str, tuple[str, int, int]] = {}
    for advert in adverts:
        for f in advert.files:
            if f.digest not in by_digest:
                offered.setdefault(f.digest, (f.alias, f.n_layers, f.ctx))
    for digest, (alias, n_layers, ctx) in sorted(offered.items(), key=lambda kv: kv[1][0]):
        listings.append(ModelListing(alias, digest, n_layers, ctx, ()))
    return listings


def resolve(listings: list[ModelListing], name: str) -> Target | None:
    """By alias, digest, or a digest prefix of at least 12 characters."""
    for listing in listings:
        if name in (listing.alias, listing.digest) or (len(name) >= 12 and listing.digest.startswith(name)):
            return Target(listing.digest, listing.alias, listing.context_length)
    return None
