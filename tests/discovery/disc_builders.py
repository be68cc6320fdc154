"""Tiny builders for discovery tests (a unique module name: tests/ has no __init__.py)."""

from __future__ import annotations

import dataclasses

from discovery.advert import Addresses, Load, ModelAdvert, NodeAdvert, Resources
from node.identity import Identity

DIGEST = "ab" * 32


def make_advert(identity: Identity | None = None, *, seq: int = 1, issued_at: float = 1000.0,
                ttl_s: float = 10.0, **changes: object) -> NodeAdvert:
    identity = identity or Identity.generate()
    advert = NodeAdvert(
        node_id=identity.node_id,
        name="node-" + identity.node_id[:6],
        version="0.1.0",
        public_key=identity.public_key_raw,
        addresses=Addresses(http="127.0.0.1:8000", grpc="127.0.0.1:9000", libp2p=()),
        models=(ModelAdvert(DIGEST, "smollm2", n_layers=30, start=0, end=30, engine="llama.cpp", ctx=2048),),
        resources=Resources("cpu", 0, 0, 16 << 30, 8 << 30, 120.0),
        load=Load(active=0, queued=0, capacity=4),
        seq=seq,
        issued_at=issued_at,
        ttl_s=ttl_s,
    )
    return dataclasses.replace(advert, **changes) if changes else advert
