"""The membership gap at rest (docs/discovery.md): two nodes whose announcements never reach each
other, both connected to one bootstrap node, must still learn of each other once the partition heals.

Real Discovery services, real libp2p hosts on loopback, mDNS and multicast off. The partition drops,
in B's and C's own receive path, everything that names the other (adverts, beats, relayed adverts) for
the first PARTITION_S: their announce windows (shortened to 1 s) pass with nothing delivered. The exchange
period is shortened too (EXCHANGE_S instead of 10 s): its first round still comes after the partition,
and the nodes meet at it, 5 s sooner.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from disc_builders import MeshNode, wait_until

import discovery.anti_entropy
import discovery.exchange
import discovery.publisher
from discovery.advert import AdvertError
from discovery.beat import decode_message
from discovery.envelope import mesh_key_from_secret
from discovery.service import Discovery

PARTITION_S = 4.0
EXCHANGE_S = 5.0  # EXCHANGE_EVERY_S in this test: longer than the partition
HEAL_BOUND_S = 25.0  # two exchange periods of the default (EXCHANGE_EVERY_S, 10 s) and slack for a loaded box


def _partition(monkeypatch: pytest.MonkeyPatch, blocks: dict[str, str], until: float) -> None:
    """Until `until`, a node whose id is in `blocks` drops every message naming blocks[its id] before
    its receive() (patched on the class: it holds from the first message the service handles)."""
    receive, key = Discovery.receive, mesh_key_from_secret("test-mesh")

    def filtered(self: Discovery, data: bytes, source: str, **kw: object) -> bool:
        blocked = blocks.get(self._identity.node_id)
        if blocked is not None and time.time() < until:
            try:
                if decode_message(data, key).node_id == blocked:
                    return False
            except AdvertError:
                pass
        return receive(self, data, source, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Discovery, "receive", filtered)


def test_two_nodes_missed_at_start_meet_after_the_partition(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovery.publisher, "ANNOUNCE_S", 1.0)
    for module in (discovery.exchange, discovery.anti_entropy):  # the loop's sleep and the round numbers
        monkeypatch.setattr(module, "EXCHANGE_EVERY_S", EXCHANGE_S)

    async def main() -> None:
        async with MeshNode(mdns=False, libp2p_port=0) as a:
            boot = a.discovery.libp2p_addrs
            until = time.time() + PARTITION_S
            b = MeshNode(mdns=False, libp2p_port=0, bootstrap=boot)
            c = MeshNode(mdns=False, libp2p_port=0, bootstrap=boot)
            _partition(monkeypatch, {b.identity.node_id: c.identity.node_id,
                                     c.identity.node_id: b.identity.node_id}, until)
            async with b, c:
                await wait_until(lambda: a.sees() == {b.identity.node_id, c.identity.node_id}, 10.0)
                await asyncio.sleep(max(0.0, until - time.time()))
                assert c.identity.node_id not in b.sees() and b.identity.node_id not in c.sees()
                took = await wait_until(
                    lambda: c.identity.node_id in b.sees() and b.identity.node_id in c.sees(), HEAL_BOUND_S
                )
                print(f"met {took:.1f} s after the partition healed")

    asyncio.run(main())
