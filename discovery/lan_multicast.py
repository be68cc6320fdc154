"""LAN advert refresh by UDP multicast: one datagram per node per refresh reaches every peer.

Fetching each peer's advert over HTTP every refresh costs each node (peers x ~1 KB) per period,
which grows with the mesh. Multicasting our own signed envelope costs one datagram per period
whatever the mesh size. mDNS still says who is there (and the first advert is still fetched over
HTTP); this only keeps known peers fresh, and carries the goodbye. Datagrams are peer input like
any other: they go through Discovery.receive, the single validation path.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable

from discovery.envelope import MAX_ENVELOPE_BYTES
from discovery.netaddr import in_networks, on_link_networks

log = logging.getLogger(__name__)

GROUP = "239.255.77.77"  # administratively scoped: never leaves the site
PORT = 5454
MAX_DATAGRAM_BYTES = 1400  # fits one Ethernet frame; a bigger advert is refreshed over HTTP instead
MULTICAST_TTL = 1  # the local link only, like mDNS
IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)  # Linux; not exported by Python 3.11

# (raw datagram, sender IP) -> handled; (reason, detail) -> counted like any refused advert
OnDatagram = Callable[[bytes, str], object]
OnReject = Callable[[str, str], None]


class _Receiver(asyncio.DatagramProtocol):
    """Drops and counts what is too big or comes from off our networks; hands the rest on."""

    def __init__(self, on_datagram: OnDatagram, nets: list[ipaddress.IPv4Network], reject: OnReject) -> None:
        self._on_datagram = on_datagram
        self._nets = nets
        self._reject = reject

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        sender = str(addr[0])
        if not in_networks(sender, self._nets):
            self._reject("off_link", sender)  # e.g. a LAN host reaching a loopback-only node
        elif len(data) > MAX_ENVELOPE_BYTES:
            self._reject("oversized", f"{len(data)} byte datagram from {sender}")
        else:
            self._on_datagram(data, sender)

    def error_received(self, exc: Exception) -> None:
        log.debug("advert multicast receive error: %r", exc)


class AdvertMulticast:
    """Sends our envelope to GROUP:PORT on each interface of `ips`; hands received ones to on_datagram.

    Runs on the asyncio loop that calls async_start(); on_datagram is called on that loop.
    """

    def __init__(
        self,
        ips: list[str],
        on_datagram: OnDatagram,
        port: int = PORT,
        reject: OnReject | None = None,
    ) -> None:
        self._ips = ips
        self._on_datagram = on_datagram
        self._reject: OnReject = reject or (lambda reason, detail: None)
        self._port = port
        # loopback (lo's MTU is 64 KiB): any advert fits one datagram; on a LAN, one Ethernet frame
        loopback = all(ipaddress.IPv4Address(ip).is_loopback for ip in ips)
        self.max_send_bytes = MAX_ENVELOPE_BYTES if loopback else MAX_DATAGRAM_BYTES
        self._senders: list[socket.socket] = []
        self._transport: asyncio.DatagramTransport | None = None
        self.sent_bytes = 0

    async def async_start(self) -> None:
        loop = asyncio.get_running_loop()
        recv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        try:
            recv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):  # several nodes on one host all get every datagram
                recv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            # Bound to the group, not 0.0.0.0: unicast to port 5454 never reaches us; and with
            # IP_MULTICAST_ALL off, only groups joined on *our* interfaces (not by other sockets).
            recv.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
            recv.bind((GROUP, self._port))
            for ip in self._ips:
                mreq = socket.inet_aton(GROUP) + socket.inet_aton(ip)
                recv.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            recv.setblocking(False)
        except OSError:
            recv.close()
            raise
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Receiver(self._on_datagram, on_link_networks(self._ips), self._reject), sock=recv
        )
        for ip in self._ips:
            send = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
            send.bind((ip, 0))  # not 0.0.0.0: a send-only socket must not listen on every interface
            send.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(ip))
            send.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, MULTICAST_TTL)
            send.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)  # peers on this host too
            send.setblocking(False)
            self._senders.append(send)

    def send(self, data: bytes) -> bool:
        """Best effort, never blocks; False when the envelope is too big for one datagram."""
        if len(data) > self.max_send_bytes:
            return False
        for sock in self._senders:
            try:
                sock.sendto(data, (GROUP, self._port))
                self.sent_bytes += len(data)
            except OSError as e:  # a full buffer or a vanished interface: the next refresh retries
                log.debug("advert multicast send failed: %r", e)
        return True

    async def async_stop(self) -> None:
        for sock in self._senders:
            sock.close()
        self._senders = []
        if self._transport is not None:
            self._transport.close()
            self._transport = None
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0)  # let the transport finish closing


async def start_multicast(ips: list[str], on_datagram: OnDatagram, reject: OnReject) -> AdvertMulticast | None:
    """LAN refresh by multicast (one datagram per period, whatever the mesh size); None when the
    sockets cannot be opened: then LAN peers are refreshed over HTTP only."""
    multicast = AdvertMulticast(ips, on_datagram, reject=reject)
    try:
        await multicast.async_start()
    except OSError as e:
        log.warning("advert multicast unavailable (%s): refreshing LAN peers over HTTP only", e)
        await multicast.async_stop()
        return None
    return multicast
