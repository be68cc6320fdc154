"""One consistent view of the mesh per request, and the catalog read from it (pure).

A request takes one `MeshView`: our own advert, built once, and one snapshot of the peers' adverts.
Everything it decides (which models exist, who holds them whole, which chains of ranges cover them)
is read from that view.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.serving import ModelListing
from discovery.advert import NodeAdvert
from placement.route_pipeline import held_by_digest, route_over


@dataclass(frozen=True, slots=True)
class Catalog:
    """What a set of adverts offers: the listings and, per model, who holds ranges of it. Built once
    per set of adverts (`catalog_key`), not per request (issue 11, finding 4)."""

    listings: tuple[ModelListing, ...]
    holders: dict[str, tuple[str, ...]]  # digest -> node ids holding some range of it

    def holder_ids(self, digest: str) -> tuple[str, ...]:
        return self.holders.get(digest, ())


@dataclass(frozen=True, slots=True)
class MeshView:
    me: NodeAdvert
    peers: tuple[NodeAdvert, ...]
    _catalog: Catalog | None = field(default=None, repr=False, compare=False)
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

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            object.__setattr__(self, "_catalog", build_catalog(self.adverts))
        assert self._catalog is not None
        return self._catalog

    def holding(self, digest: str) -> list[NodeAdvert]:
        """The current adverts of the nodes holding some range of `digest` (ours first)."""
        return [a for n in self.catalog.holder_ids(digest) if (a := self._by_id.get(n)) is not None]


def catalog_key(me: NodeAdvert, peers: tuple[NodeAdvert, ...]) -> tuple:
    """What the catalog depends on: our models and files, and each peer advert's identity. A peer's
    new advert has a new seq; loads are left out (the catalog ignores them)."""
    return (me.node_id, me.name, me.models, me.files, tuple((a.node_id, a.seq, a.issued_at) for a in peers))


@dataclass(frozen=True, slots=True)
class Target:
    """The model a request asked for, once resolved."""

    digest: str
    alias: str
    context_length: int


def list_models(view: MeshView) -> list[ModelListing]:
    return list(view.catalog.listings)


def build_catalog(adverts: list[NodeAdvert]) -> Catalog:
    """Models held whole somewhere, models whose layer ranges chain into a full pipeline (queues
    ignored), and models only offered (loaded on the first request). One pass over the adverts plus
    one shortest path per model over that model's ranges alone."""
    held = held_by_digest(adverts)
    names = {a.node_id: a.name for a in reversed(adverts)}  # ours wins a duplicate id
    listings = []
    targets = []
    for digest, pairs in held.items():
        first = pairs[0][1]
        targets.append((first.alias, digest, first, pairs))
    for alias, digest, first, pairs in sorted(targets, key=lambda t: (t[0], t[1])):
        whole = list(dict.fromkeys(names[a.node_id] for a, m in pairs if m.whole))
        if whole:
            listings.append(ModelListing(alias, digest, first.n_layers, first.ctx, tuple(whole)))
        elif (route := route_over(pairs, with_load=False)) is not None:
            chain = tuple(names[s.node] for s in route.stages)
            listings.append(ModelListing(alias, digest, first.n_layers, first.ctx, chain))
    offered: dict[str, tuple[str, int, int]] = {}
    for advert in adverts:
        for f in advert.files:
            if f.digest not in held:
                offered.setdefault(f.digest, (f.alias, f.n_layers, f.ctx))
    for digest, (alias, n_layers, ctx) in sorted(offered.items(), key=lambda kv: kv[1][0]):
        listings.append(ModelListing(alias, digest, n_layers, ctx, ()))
    holders = {d: tuple(dict.fromkeys(a.node_id for a, _ in pairs)) for d, pairs in held.items()}
    return Catalog(tuple(listings), holders)


def resolve(listings: list[ModelListing], name: str) -> Target | None:
    """By alias, digest, or a digest prefix of at least 12 characters."""
    for listing in listings:
        if name in (listing.alias, listing.digest) or (len(name) >= 12 and listing.digest.startswith(name)):
            return Target(listing.digest, listing.alias, listing.context_length)
    return None
