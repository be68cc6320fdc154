"""mDNS on loopback: real zeroconf, real aiohttp servers, several Discovery instances in one process."""

from __future__ import annotations

import asyncio
import contextlib

from disc_builders import MeshNode, wait_until

from discovery.mdns import mem_bucket, parse_txt, txt_properties
from discovery.service import ChangeKind


def test_three_nodes_see_each_other_and_leave_on_goodbye() -> None:
    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            nodes = [await stack.enter_async_context(MeshNode()) for _ in range(3)]
            ids = {n.identity.node_id for n in nodes}
            await wait_until(lambda: all(n.sees() == ids - {n.identity.node_id} for n in nodes), 5.0)
            gone = nodes[2].identity.node_id
            await nodes[2].__aexit__(None, None, None)
            await wait_until(lambda: all(gone not in n.sees() for n in nodes[:2]), 2.0)
            assert any(c.kind is ChangeKind.LEFT and c.node_id == gone for c in nodes[0].changes)
            nodes[2].discovery = None  # already stopped
            nodes[2].runner = None

    asyncio.run(main())


def test_other_mesh_is_never_admitted() -> None:
    async def main() -> None:
        async with MeshNode("mesh-a") as a, MeshNode("mesh-a") as b, MeshNode("mesh-b") as c:
            await wait_until(
                lambda: a.sees() == {b.identity.node_id} and b.sees() == {a.identity.node_id}, 5.0
            )
            await wait_until(lambda: a.discovery.rejects.get("other_mesh", 0) > 0, 5.0)
            assert c.sees() == set()
            assert c.identity.node_id not in a.sees() | b.sees()

    asyncio.run(main())


def test_txt_pointer_round_trip_and_junk() -> None:
    props = {k.encode(): v.encode() for k, v in txt_properties("a" * 32, 8000, 9000, 3).items()}
    pointer = parse_txt(props, "127.0.0.1")
    assert pointer is not None and (pointer.port_http, pointer.port_grpc, pointer.mem_bucket) == (
        8000,
        9000,
        3,
    )
    assert parse_txt({**props, b"h": b"99999"}, "h") is None
    assert parse_txt({**props, b"id": b"short"}, "h") is None
    assert parse_txt({b"\xff": None}, "h") is None
    assert [mem_bucket(b) for b in (0, 2**30 - 1, 2**30, 3 * 2**30, 64 * 2**30)] == [0, 0, 1, 2, 7]
