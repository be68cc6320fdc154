"""Tiny builders for discovery tests (a unique module name: tests/ has no __init__.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence

from aiohttp import web

from discovery.advert import Addresses, Load, ModelAdvert, NodeAdvert, Resources
from discovery.envelope import mesh_key_from_secret
from discovery.identity import Identity
from discovery.peer_table import PeerTable
from discovery.service import Discovery, PeerChange

DIGEST = "ab" * 32


def make_advert(
    identity: Identity | None = None,
    *,
    seq: int = 1,
    issued_at: float = 1000.0,
    ttl_s: float = 10.0,
    **changes: object,
) -> NodeAdvert:
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


class MeshNode:
    """A Discovery plus the tiny aiohttp server a real node would run for GET /mesh/advert."""

    def __init__(
        self,
        secret: str = "test-mesh",
        *,
        mdns: bool = True,
        multicast: bool | None = None,  # default: as mdns (mdns=False means no LAN/loopback discovery)
        libp2p_port: int | None = None,
        bootstrap: Sequence[str] = (),
        ttl_s: float = 10.0,
        refresh_s: float = 2.5,
    ) -> None:
        self.identity = Identity.generate()
        self.secret = secret
        self.table = PeerTable(self.identity.node_id)
        self.changes: list[PeerChange] = []
        self._kw = dict(
            mdns=mdns, multicast=mdns if multicast is None else multicast, libp2p_port=libp2p_port, bootstrap=bootstrap, ttl_s=ttl_s, refresh_s=refresh_s
        )
        self.discovery: Discovery | None = None
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def __aenter__(self) -> MeshNode:
        app = web.Application()
        app.router.add_get("/mesh/advert", self._advert)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        advert = make_advert(self.identity, addresses=Addresses(f"127.0.0.1:{self.port}", "127.0.0.1:0", ()))
        self.discovery = Discovery(
            self.identity, mesh_key_from_secret(self.secret), lambda: advert, self.table, **self._kw
        )
        self.discovery.on_change(self.changes.append)
        await self.discovery.start()
        return self

    async def _advert(self, request: web.Request) -> web.Response:
        assert self.discovery is not None
        return web.Response(body=self.discovery.signed_advert(), content_type="application/octet-stream")

    def sees(self) -> set[str]:
        return {p.advert.node_id for p in self.table.snapshot(time.time())}

    async def __aexit__(self, *exc: object) -> None:
        if self.discovery is not None:
            await self.discovery.stop()
        if self.runner is not None:
            await self.runner.cleanup()


async def wait_until(pred: Callable[[], bool], timeout_s: float) -> float:
    """Seconds it took for pred() to hold; raises TimeoutError after timeout_s."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - t0
