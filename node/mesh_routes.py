"""HTTP routes about the mesh itself: our signed advert, our peers, ourselves."""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from discovery.fetch import ADVERT_TOKEN_HEADER

if TYPE_CHECKING:
    from node.daemon import Node

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def advert_handler(signed_advert: Callable[[], bytes], token: str | None) -> Handler:
    """GET /mesh/advert: the raw signed envelope (peers verify the signature and the mesh HMAC).

    With `token` (a node on a LAN) only members get it, as with gRPC GetAdvert: the envelope names our
    models, addresses and resources. Without (loopback only) anyone on this machine may read it."""

    async def advert(request: web.Request) -> web.StreamResponse:
        if token is not None and not hmac.compare_digest(request.headers.get(ADVERT_TOKEN_HEADER, ""), token):
            return web.Response(status=401, text="not a member of this mesh\n")
        return web.Response(body=signed_advert(), content_type="application/octet-stream")

    return advert


def add_mesh_routes(app: web.Application, node: Node) -> None:
    async def peers(request: web.Request) -> web.StreamResponse:
        now = time.time()
        rows = []
        for peer in node.table.snapshot(now):
            row = peer.advert.to_dict()
            row["last_seen_s"] = round(peer.last_seen_s(now), 3)
            row["source"] = peer.source
            rows.append(row)
        return web.json_response(rows)

    app.router.add_get("/mesh/advert", advert_handler(node.discovery.signed_advert, node.advert_token_required))
    app.router.add_get("/mesh/peers", peers)
