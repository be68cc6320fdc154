"""Forged adverts against real node processes: over mDNS + HTTP fetch, and over libp2p gossipsub.

The test process plays the attacker. Over mDNS it announces `_meshllm._tcp.local.` services whose
pointers lead to tiny aiohttp servers, each serving one forgery at `/mesh/advert`; over libp2p it
joins the node's private network (it holds the mesh key: a member gone bad) and publishes forgeries
on the advert topic. The node must refuse and count each by reason, never list the forger, and keep
serving.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiohttp import web
from conftest import NodeProc
from discovery_forgeries import forgeries, signed
from discovery_mesh_helpers import get_json, mesh_secret, node_id, start_parallel

from discovery.envelope import decode_signed, derive_subkey, mesh_key_from_secret
from discovery.fetch import ADVERT_TOKEN_HEADER, advert_token
from discovery.identity import Identity
from discovery.libp2p_host import Libp2pHost
from discovery.mdns import Mdns

COUNT_TIMEOUT_S = 15.0


async def _serve(body: Callable[[], bytes]) -> tuple[web.AppRunner, int]:
    async def advert(_request: web.Request) -> web.Response:
        return web.Response(body=body(), content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/mesh/advert", advert)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def _fake_mdns_peer(body: Callable[[], bytes]) -> tuple[web.AppRunner, Mdns]:
    """An mDNS pointer (a fresh fake node id) to a server that answers with body()."""
    runner, port = await _serve(body)
    mdns = Mdns(Identity.generate().node_id, ["127.0.0.1"], port, 0, 3, lambda _p: None, lambda _p: None)
    await mdns.async_start()
    return runner, mdns


async def _json(url: str) -> dict | list:
    return await asyncio.to_thread(get_json, url)


async def _wait_rejects(url: str, want: set[str], timeout_s: float = COUNT_TIMEOUT_S) -> dict[str, int]:
    t0 = time.monotonic()
    while True:
        rejects = (await _json(url + "/mesh/self"))["rejected_adverts"]  # type: ignore[index]
        if want <= {reason for reason, n in rejects.items() if n > 0}:
            return rejects
        assert time.monotonic() - t0 < timeout_s, f"rejects by reason {rejects}, want {sorted(want)}"
        await asyncio.sleep(0.2)


def test_forged_adverts_over_mdns_are_refused_and_counted(node_factory: Callable[..., NodeProc]) -> None:
    secret = mesh_secret("forge")
    # LAN mode on the loopback interface: zeroconf runs there, as it would on a LAN
    args = ("--no-model", "--mesh-secret", secret, "--lan", "--advertise-host", "127.0.0.1")
    (node, _), (victim, _) = start_parallel(node_factory, [("target", *args), ("victim", *args)])
    victim_id = node_id(victim.url)
    forger = Identity.generate()
    mesh_key = mesh_key_from_secret(secret)
    forged = forgeries(mesh_key, victim_id, forger)

    async def main() -> None:
        fakes = []
        try:
            for body in forged.values():
                fakes.append(await _fake_mdns_peer(lambda body=body: body))
            # replay: a genuine advert of the victim, captured now and served once the node holds a newer one;
            # it names the victim's address, not the server it came from: refused as address_mismatch
            captured = await asyncio.to_thread(_get_bytes, victim.url + "/mesh/advert", advert_token(mesh_key))
            # a newcomer makes the victim re-publish (a new seq) at once, so the capture becomes a replay
            await asyncio.to_thread(node_factory, "newcomer", *args)
            await _victim_seq_after(node.url, victim_id, decode_signed(captured, mesh_key).seq)
            fakes.append(await _fake_mdns_peer(lambda: captured))
            rejects = await _wait_rejects(node.url, {*forged, "address_mismatch"})
            print(f"rejected by reason: {rejects}")
            assert (await _json(node.url + "/health")) == {"status": "ok"}
            peers = await _json(node.url + "/mesh/peers")
            assert victim_id in [p["node_id"] for p in peers]
            assert {p["name"] for p in peers} == {"victim", "newcomer"}, "only the genuine peers are listed"
            assert forger.public_key_raw.hex() not in {p["public_key"] for p in peers}
        finally:
            for runner, mdns in fakes:
                await mdns.async_stop()
                await runner.cleanup()

    asyncio.run(main())
    assert node.proc.poll() is None


def test_forged_adverts_over_libp2p_are_refused_and_counted(node_factory: Callable[..., NodeProc]) -> None:
    secret = mesh_secret("forge-p2p")
    mesh_key = mesh_key_from_secret(secret)
    node = node_factory("p2p-target", "--no-model", "--no-mdns", "--mesh-secret", secret, "--libp2p-port", "0")
    me = get_json(node.url + "/mesh/self")
    honest, forger = Identity.generate(), Identity.generate()
    forged = forgeries(mesh_key, honest.node_id, forger)

    async def main() -> None:
        host = Libp2pHost(
            forger,
            lambda _data: None,
            bootstrap=me["addresses"]["libp2p"],
            psk_hex=derive_subkey(mesh_key, "libp2p-pnet").hex(),
        )
        await host.start()
        try:
            # a genuine advert first: it proves the gossip path works, and gives the replay a newer seq
            newer = signed(honest, mesh_key, seq=2_000, name="honest")
            older = signed(honest, mesh_key, seq=1_000, name="honest")
            t0 = time.monotonic()
            while honest.node_id not in {p["node_id"] for p in await _json(node.url + "/mesh/peers")}:
                assert time.monotonic() - t0 < COUNT_TIMEOUT_S, "a genuine advert over gossipsub never arrived"
                host.publish(newer)
                await asyncio.sleep(0.3)
            for _ in range(3):  # gossipsub is best effort: publish a few rounds
                for data in (*forged.values(), older):
                    host.publish(data)
                await asyncio.sleep(0.3)
            rejects = await _wait_rejects(node.url, {*forged, "replayed_seq"})
            print(f"rejected by reason: {rejects}")
            assert (await _json(node.url + "/health")) == {"status": "ok"}
            peers = await _json(node.url + "/mesh/peers")
            assert [(p["node_id"], p["name"], p["seq"]) for p in peers] == [(honest.node_id, "honest", 2_000)]
        finally:
            await host.stop()

    asyncio.run(main())
    assert node.proc.poll() is None


def _get_bytes(url: str, token: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(url, headers={ADVERT_TOKEN_HEADER: token}), timeout=5) as resp:
        return resp.read()


async def _victim_seq_after(url: str, victim_id: str, after: int) -> int:
    """Waits until the node lists the victim with a seq above `after`; returns that seq."""
    t0 = time.monotonic()
    while True:
        for p in await _json(url + "/mesh/peers"):  # type: ignore[union-attr]
            if p["node_id"] == victim_id and p["seq"] > after:
                return p["seq"]
        assert time.monotonic() - t0 < COUNT_TIMEOUT_S, "the node never refreshed the victim's advert"
        await asyncio.sleep(0.2)
