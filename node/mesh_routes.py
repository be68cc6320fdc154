"""HTTP routes about the mesh itself: our signed advert, our peers, ourselves."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from node.daemon import Node


def add_mesh_routes(app: web.Application, node: Node) -> None:
    async def advert(request: web.Request) -> web.StreamResponse:
        # The raw signed envelope: peers verify the signature and the mesh HMAC themselves.
        return web.Response(body=node.discovery.signed_advert(), content_type="application/octet-stream")

    async def peers(request: web.Request) -> web.StreamResponse:
        now = time.time()
        rows = []
        for peer in node.table.snapshot(now):
            row = peer.advert.to_dict()
            row["last_seen_s"] = round(peer.last_seen_s(now), 3)
            row["source"] = peer.source
            rows.append(row)
        return web.json_response(rows)

    app.router.add_get("/mesh/advert", advert)
    app.router.add_get("/mesh/peers", peers)
