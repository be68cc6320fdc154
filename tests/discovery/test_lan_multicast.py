"""LAN refresh by multicast: datagrams on loopback, and HTTP fetches only on discovery."""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets

from disc_builders import MeshNode, wait_until

from discovery.lan_multicast import AdvertMulticast


def test_datagrams_reach_every_receiver_and_big_ones_are_not_sent() -> None:
    async def main() -> None:
        port = random.randrange(20000, 60000)  # not the real port: nodes of other tests use that one
        got: list[list[bytes]] = [[], []]
        senders = [AdvertMulticast(["127.0.0.1"], lambda d, _s, i=i: got[i].append(d), port=port) for i in range(2)]
        for s in senders:
            await s.async_start()
        try:
            assert senders[0].send(b"hello")
            assert not senders[0].send(b"x" * (senders[0].max_send_bytes + 1))
            await wait_until(lambda: got[0] == [b"hello"] and got[1] == [b"hello"], 2.0)  # ours loop back too
            await asyncio.sleep(0.2)
            assert got == [[b"hello"], [b"hello"]]
        finally:
            for s in senders:
                await s.async_stop()

    asyncio.run(main())


def test_peers_stay_fresh_by_multicast_without_http_refetches() -> None:
    async def main() -> None:
        secret = f"multicast-{secrets.token_hex(6)}"  # other meshes on this machine stay out
        async with contextlib.AsyncExitStack() as stack:
            nodes = [await stack.enter_async_context(MeshNode(secret, refresh_s=0.5, ttl_s=3.0)) for _ in range(3)]
            ours = {n.port for n in nodes}
            fetched: list[int] = []  # HTTP fetches our nodes make to our nodes (others' are refused)
            for n in nodes:
                lan = n.discovery._lan

                async def counting(host: str, port: int, grpc: int, fetch=lan._fetch) -> bytes:
                    if port in ours:
                        fetched.append(port)
                    return await fetch(host, port, grpc)

                lan._fetch = counting
            ids = {n.identity.node_id for n in nodes}
            await wait_until(lambda: all(n.sees() == ids - {n.identity.node_id} for n in nodes), 5.0)
            await asyncio.sleep(1.0)
            fetched.clear()
            await asyncio.sleep(3.0)  # six refresh periods, one ttl
            assert all(n.sees() == ids - {n.identity.node_id} for n in nodes)
            # HTTP refresh would be 3 nodes x 2 peers x 6 periods = 36 fetches; multicast leaves ~none
            assert len(fetched) <= 6, fetched

    asyncio.run(main())
