"""libp2p on loopback with mDNS off: bootstrap, gossipsub delivery, private network per mesh."""

from __future__ import annotations

import asyncio
import threading

from disc_builders import MeshNode, wait_until

from discovery.libp2p_keys import peer_id_of


def test_two_nodes_meet_through_one_bootstrap_and_say_goodbye() -> None:
    async def main() -> None:
        async with MeshNode(mdns=False, libp2p_port=0) as a:
            assert a.discovery.libp2p_addrs[0].endswith("/p2p/" + peer_id_of(a.identity))
            async with MeshNode(mdns=False, libp2p_port=0, bootstrap=a.discovery.libp2p_addrs) as b:
                await wait_until(
                    lambda: a.sees() == {b.identity.node_id} and b.sees() == {a.identity.node_id}, 10.0
                )
                peer = a.table.get(b.identity.node_id)
                assert peer is not None and peer.source == "libp2p"
                assert peer.advert.addresses.libp2p == tuple(b.discovery.libp2p_addrs)
            # b's signed goodbye travels over gossipsub: no waiting for the ttl
            await wait_until(lambda: a.sees() == set(), 1.0)

    asyncio.run(main())
    assert not [t.name for t in threading.enumerate() if t.name.startswith("libp2p-")]


def test_other_mesh_secret_cannot_connect_or_appear() -> None:
    async def main() -> None:
        async with MeshNode("mesh-a", mdns=False, libp2p_port=0) as a:
            boot = a.discovery.libp2p_addrs
            async with (
                MeshNode("mesh-a", mdns=False, libp2p_port=0, bootstrap=boot) as b,
                MeshNode("mesh-b", mdns=False, libp2p_port=0, bootstrap=boot) as c,
            ):
                await wait_until(lambda: b.identity.node_id in a.sees(), 10.0)
                await asyncio.sleep(3.0)  # a few publish rounds for c to (fail to) get through
                assert c.identity.node_id not in a.sees() | b.sees()
                assert c.sees() == set()

    asyncio.run(main())
