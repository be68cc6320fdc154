"""Records mode: when this node knows no usable holder of a model, it looks the model up in the DHT
(`Discovery.lookup_model`) and waits, bounded, for the holders' adverts to reach its PeerTable.

`has_holder` and `known` are pure; `await_view` only polls a view function on the loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from dataplane.routing.view import MeshView, list_models, resolve

LOOKUP_WAIT_S = 8.0  # a DHT walk plus a dial: about 1 s on a LAN, a few s across the internet
POLL_S = 0.1
# A holder learns us from the introduction frame of our beat stream (sent within 0.5 s of the dial)
# and accepts our TLS certificate only then: wait that long after its advert reached us.
SETTLE_S = 1.0

Lookup = Callable[[str], None]  # Discovery.lookup_model: by model alias or digest


def known(view: MeshView, model: str) -> bool:
    """Does the view list `model` (alias, digest or digest prefix) as servable or offered?"""
    return resolve(list_models(view), model) is not None


def has_holder(view: MeshView, digest: str, exclude: frozenset[str]) -> bool:
    """Is some range of `digest` held by a node not excluded (a failed one)?"""
    return any(a.node_id not in exclude for a in view.holding(digest))


async def await_view(view: Callable[[], MeshView], ready: Callable[[MeshView], bool],
                     timeout_s: float = LOOKUP_WAIT_S, settle_s: float = SETTLE_S) -> MeshView | None:
    """Polls `view()` until `ready` holds (then waits `settle_s` and returns a fresh view), None after
    `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready(view()):
            await asyncio.sleep(settle_s)
            return view()
        await asyncio.sleep(POLL_S)
    return None
