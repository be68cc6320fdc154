"""LAN membership: mDNS pointers turned into signed adverts by fetching them from each node.

Mdns only says who to ask; this class asks (on discovery, every refresh_s, and when a record is
removed) and hands the raw bytes to Discovery.receive, the single validation path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from discovery.fetch import AdvertTooLarge, FetchAdvert, FetchError
from discovery.mdns import Mdns, MdnsPointer

log = logging.getLogger(__name__)

MAX_FETCH_FAILURES = 3  # consecutive failed fetches before an mDNS pointer is forgotten
MAX_TRACKED = 4096
FETCH_AFTER_PERIODS = 1.6  # fetch a peer not heard from for this many refresh periods (multicast jitters)


class LanPeers:
    def __init__(
        self,
        fetch: FetchAdvert,
        receive: Callable[[bytes, str], bool],
        goodbye: Callable[[str], None],
        seen_s: Callable[[str], float | None],
        refresh_s: float,
        reject: Callable[[str, str], None],
    ) -> None:
        self._fetch = fetch
        # (raw envelope, "host:port" fetched from) -> Discovery.receive: accepted? The advert must name
        # that very address, so a pointer cannot make us take (or fetch for) anything else.
        self._receive = receive
        self._goodbye = goodbye  # node id -> drop it now (a removed record whose node cannot answer)
        self._seen_s = seen_s  # node id -> seconds since its last advert from any source, None if unknown
        self._refresh_s = refresh_s
        self._reject = reject  # (reason, detail) -> counted like any refused advert
        self.mdns: Mdns | None = None  # set by the owner before start()
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._failures: dict[str, int] = {}
        self.fetch_failures = 0
        self.fetches = 0

    def on_found(self, pointer: MdnsPointer) -> None:
        self._spawn(pointer, removed=False)

    def on_removed(self, pointer: MdnsPointer) -> None:
        # mDNS is unauthenticated: confirm by asking the node. A departed node answers with its
        # signed goodbye, a dead one not at all; a spoofed removal gets a live advert and is ignored.
        self._spawn(pointer, removed=True)

    async def refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s / 2)
            for pointer in self.mdns.pointers if self.mdns is not None else []:
                seen_s = self._seen_s(pointer.node_id)
                # a peer that refreshed itself (multicast, gossip) within a period and a bit needs no
                # HTTP round trip: per-peer fetches would cost every node peers x ~1 KB per period
                if seen_s is None or seen_s >= self._refresh_s * FETCH_AFTER_PERIODS:
                    self._spawn(pointer, removed=False)

    async def stop(self) -> None:
        tasks = list(self._in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, pointer: MdnsPointer, removed: bool) -> None:
        key = f"{pointer.node_id}/{removed}"
        if key in self._in_flight or len(self._in_flight) >= MAX_TRACKED:
            return
        task = asyncio.create_task(self._fetch_one(pointer, removed))
        self._in_flight[key] = task
        task.add_done_callback(lambda _t: self._in_flight.pop(key, None))

    async def _fetch_one(self, pointer: MdnsPointer, removed: bool) -> None:
        self.fetches += 1
        try:
            data = await self._fetch(pointer.host, pointer.port_http, pointer.port_grpc)
        except (FetchError, OSError, TimeoutError) as e:
            if isinstance(e, AdvertTooLarge):
                self._reject("oversized", f"{pointer.host}:{pointer.port_http}")
            self._failed(pointer, removed, e)
            return
        if self._receive(data, f"{pointer.host}:{pointer.port_http}"):
            self._failures.pop(pointer.node_id, None)
        else:  # refused (another mesh, a forgery): after a few, stop asking until it announces again
            self._failed(pointer, removed=False, error=None)

    def _failed(self, pointer: MdnsPointer, removed: bool, error: Exception | None) -> None:
        if error is not None:
            self.fetch_failures += 1
            log.debug("advert fetch from %s:%d failed: %r", pointer.host, pointer.port_http, error)
        if removed:
            self._goodbye(pointer.node_id)
        failures = self._failures.get(pointer.node_id, 0) + 1
        if failures >= MAX_FETCH_FAILURES and self.mdns is not None:
            self.mdns.forget(pointer.node_id)  # a fresh announcement from it brings it back
            failures = 0
        if pointer.node_id in self._failures or len(self._failures) < MAX_TRACKED:
            self._failures[pointer.node_id] = failures
