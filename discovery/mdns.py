"""LAN discovery over mDNS: announce a pointer to our advert, browse for others' pointers.

TXT strings are capped at 255 bytes and every update costs multicast sends, so the TXT record holds
only a pointer (node id, ports, a coarse free-memory bucket). The signed advert itself is fetched
from the node (see fetch.py); nothing in TXT is trusted beyond "who to ask".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from discovery.netaddr import in_networks, on_link_networks

log = logging.getLogger(__name__)

SERVICE_TYPE = "_meshllm._tcp.local."
TXT_VERSION = "1"
MAX_SERVICES = 1024  # a hostile LAN can announce many services: cap what we remember
RESOLVE_TIMEOUT_MS = 3000


@dataclass(frozen=True, slots=True)
class MdnsPointer:
    node_id: str
    host: str
    port_http: int
    port_grpc: int
    mem_bucket: int


def mem_bucket(free_bytes: int) -> int:
    """0 below 1 GiB, else 1 + floor(log2(GiB)): changes rarely, so TXT updates stay rare."""
    gib = free_bytes / 2**30
    return 0 if gib < 1 else 1 + int(math.log2(gib))


def txt_properties(node_id: str, port_http: int, port_grpc: int, bucket: int) -> dict[str, str]:
    return {"v": TXT_VERSION, "id": node_id, "h": str(port_http), "g": str(port_grpc), "m": str(bucket)}


def parse_txt(props: dict[bytes, bytes | None], host: str) -> MdnsPointer | None:
    """The pointer in a peer's TXT record, or None when anything is missing or malformed."""
    try:
        txt = {k.decode("ascii"): (v or b"").decode("ascii") for k, v in props.items()}
        node_id = txt["id"]
        port_http, port_grpc, bucket = int(txt["h"]), int(txt["g"]), int(txt["m"])
    except (KeyError, ValueError, UnicodeDecodeError):
        return None
    if txt.get("v") != TXT_VERSION or len(node_id) != 32 or not 0 < port_http < 65536:
        return None
    if not 0 <= port_grpc < 65536 or not 0 <= bucket < 64:
        return None
    return MdnsPointer(node_id, host, port_http, port_grpc, bucket)


class Mdns:
    """Registers our service and reports peers' pointers. Runs on the asyncio loop that starts it."""

    def __init__(
        self,
        node_id: str,
        ips: list[str],
        port_http: int,
        port_grpc: int,
        bucket: int,
        on_found: Callable[[MdnsPointer], None],
        on_removed: Callable[[MdnsPointer], None],
    ) -> None:
        self._node_id = node_id
        self._ips = ips
        self._ports = (port_http, port_grpc)
        self._bucket = bucket
        self._on_found = on_found
        self._on_removed = on_removed
        self._name = f"meshllm-{node_id}.{SERVICE_TYPE}"
        self._known: dict[str, MdnsPointer] = {}  # service name -> pointer
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._announce: Awaitable[object] | None = None
        self._nets: list = []
        self.refused = 0  # pointers naming an off-link host or a port other than the service's

    @property
    def pointers(self) -> list[MdnsPointer]:
        return list(self._known.values())

    def _service_info(self) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            SERVICE_TYPE,
            self._name,
            port=self._ports[0],
            properties=txt_properties(self._node_id, *self._ports, self._bucket),
            server=f"meshllm-{self._node_id[:16]}.local.",
            addresses=[socket.inet_aton(ip) for ip in self._ips],
        )

    async def async_start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._nets = on_link_networks(self._ips)
        # Only the interfaces we announce on (not InterfaceChoice.All): a node bound to one network
        # neither answers nor browses on the others.
        self._azc = AsyncZeroconf(ip_version=IPVersion.V4Only, interfaces=list(self._ips))
        self._info = self._service_info()
        # The name embeds our node id, so it is unique: skip the ~1 s probing for conflicts. The
        # announcements go out in the background (the returned future); waiting adds 0.5 s to start.
        self._announce = await self._azc.async_register_service(self._info, cooperating_responders=True)
        self._browser = AsyncServiceBrowser(self._azc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])

    def forget(self, node_id: str) -> None:
        """Drops a pointer whose node stopped answering; a fresh mDNS announcement brings it back."""
        for name, pointer in list(self._known.items()):
            if pointer.node_id == node_id:
                del self._known[name]

    async def async_update_bucket(self, bucket: int) -> None:
        if bucket == self._bucket or self._azc is None:
            return
        self._bucket = bucket
        self._info = self._service_info()
        await (await self._azc.async_update_service(self._info))

    async def async_stop(self) -> None:
        """Cancels browsing and sends the mDNS goodbye (unregister) for our service."""
        if self._azc is None:
            return
        if self._browser is not None:
            await self._browser.async_cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._announce is not None:
            with contextlib.suppress(Exception):
                await self._announce
        if self._info is not None:
            # unregister returns a future for the goodbye packets: await it, or they never leave
            await (await self._azc.async_unregister_service(self._info))
        await self._azc.async_close()
        self._azc = None

    def _on_change(
        self, zeroconf: object, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        # zeroconf may call this from its own thread: hop onto our loop before touching any state
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._handle, name, state_change)
        except RuntimeError:
            pass  # loop closed during shutdown

    def _handle(self, name: str, state_change: ServiceStateChange) -> None:
        if name == self._name or self._azc is None:
            return
        if state_change is ServiceStateChange.Removed:
            pointer = self._known.pop(name, None)
            if pointer is not None:
                self._on_removed(pointer)
            return
        if name not in self._known and len(self._known) >= MAX_SERVICES:
            return
        task = asyncio.create_task(self._resolve(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        assert self._azc is not None
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._azc.zeroconf, RESOLVE_TIMEOUT_MS):
            return
        hosts = info.parsed_addresses(IPVersion.V4Only)
        if not hosts or not info.properties:
            return
        # A pointer says only "ask this on-link host at the service's port": the SRV port must be the
        # TXT one, and the host on a network we announce on, so a LAN stranger cannot make us
        # fetch from an arbitrary host and port. The fetched advert must name that address too.
        on_link = [h for h in hosts if in_networks(h, self._nets)]
        pointer = parse_txt(info.properties, on_link[0]) if on_link else None
        if pointer is None or pointer.port_http != info.port:
            self.refused += 1
            return
        if pointer.node_id == self._node_id:
            return
        self._known[name] = pointer
        self._on_found(pointer)
