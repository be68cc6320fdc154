"""LoadGate (dataplane/load_gate.py): a range unloaded again leaves the cap; the per-peer window stays."""

from __future__ import annotations

import asyncio

import pytest

from core.errors import Busy, Refused
from dataplane.load_gate import LoadGate


def test_unloaded_ranges_leave_the_cap_but_not_the_peer_window() -> None:
    now = [0.0]
    gate = LoadGate(per_peer=3, window_s=600.0, max_ranges=2, clock=lambda: now[0])

    async def load(peer: str, start: int) -> None:
        async with gate.admit(peer, "d" * 64, start, start + 1):
            pass

    async def main() -> None:
        await load("node:a", 0)
        await load("node:b", 1)
        with pytest.raises(Refused):  # two ranges held for the mesh: the cap
            await load("node:c", 2)
        gate.unloaded("d" * 64, 0, 1)
        await load("node:c", 2)  # one range went: room again
        gate.unloaded("d" * 64, 1, 2)
        gate.unloaded("d" * 64, 2, 3)
        await load("node:a", 0)  # reloading an unloaded range counts against the peer again
        gate.unloaded("d" * 64, 0, 1)
        await load("node:a", 0)
        gate.unloaded("d" * 64, 0, 1)
        with pytest.raises(Busy):  # node:a used its 3 loads in the window, unloads or not
            await load("node:a", 0)
        now[0] = 601.0
        await load("node:a", 0)

    asyncio.run(main())
