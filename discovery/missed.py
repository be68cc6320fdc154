"""Fetches, over HTTP, the advert a verified heartbeat names when we hold an older one (its push was lost)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from discovery.fetch import FetchAdvert, FetchError
from discovery.netaddr import port_of
from discovery.peer_table import Peer

log = logging.getLogger(__name__)

MAX_MISSED_FETCHES = 16  # adverts fetched at once because a heartbeat named a seq we do not have


class MissedAdverts:
    """At most one fetch per peer and MAX_MISSED_FETCHES in all; each result goes to `receive`."""

    def __init__(self, fetch: FetchAdvert, receive: Callable[[bytes], object]) -> None:
        self._fetch = fetch
        self._receive = receive
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def fetch(self, peer: Peer) -> None:
        node_id = peer.advert.node_id
        host, _, port = peer.advert.addresses.http.rpartition(":")
        fetch = self._fetch
        if node_id in self._tasks or len(self._tasks) >= MAX_MISSED_FETCHES or not host:
            return

        async def fetch_one() -> None:
            try:
                self._receive(await fetch(host, port_of(f":{port}"), port_of(peer.advert.addresses.grpc)))
            except (FetchError, OSError, TimeoutError) as e:
                log.debug("fetching the missed advert of %s failed: %r", node_id, e)

        task = asyncio.create_task(fetch_one(), name=f"discovery-missed-{node_id[:8]}")
        self._tasks[node_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(node_id, None))

    def cancel(self) -> list[asyncio.Task[None]]:
        """Cancels every fetch in flight; returns them, for the caller to await."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        return tasks
