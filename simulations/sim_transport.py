"""Simulated transports under the production `Discovery`: a libp2p host and a LAN multicast socket.

They offer the methods the Publisher and `Discovery.receive` call on the real ones (`publish`,
`send_direct`, `connect`, `addrs`; `send`), move the very bytes the Publisher signed, after a link's
latency on the simulated clock, into the receiver's `Discovery.receive`, and count what each node
sends and receives with the wire costs of `traffic_model`.

Modes of the libp2p host: `gossip` (today's nodes: `publish` floods a changed advert over gossipsub
to every node) and `records` (past one LAN: no mesh-wide flood; a changed advert is put under the
keys of the models the node holds, `discovery/model_records.py`, and readers look keys up).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from discovery.envelope import MAX_ENVELOPE_BYTES as MAX_FRAME_BYTES  # = libp2p_direct.MAX_FRAME_BYTES
from simulations import traffic_model as tm

if TYPE_CHECKING:
    from simulations.events import EventQueue
    from simulations.sim_node import SimNode

MAX_CONNECTIONS = 64  # discovery/libp2p_host.py MAX_CONNECTIONS (importing it would load py-libp2p)


def peer_id_for(node_id: str) -> str:
    """A stand-in libp2p peer id of the real length (52 chars, "12D3KooW..."), unique per node."""
    return "12D3KooW" + hashlib.sha256(node_id.encode()).hexdigest()[:44]


@dataclass(slots=True)
class Traffic:
    sent: dict[int, int] = field(default_factory=dict)  # node index -> bytes
    received: dict[int, int] = field(default_factory=dict)
    messages: int = 0

    def count(self, src: int, dst: int, nbytes: int) -> None:
        self.sent[src] = self.sent.get(src, 0) + nbytes
        self.received[dst] = self.received.get(dst, 0) + nbytes
        self.messages += 1

    def add_sent(self, node: int, nbytes: float) -> None:
        self.sent[node] = self.sent.get(node, 0) + int(nbytes)

    def add_received(self, node: int, nbytes: float) -> None:
        self.received[node] = self.received.get(node, 0) + int(nbytes)


class SimNet:
    """The links between simulated nodes: who is connected, how long a message takes, what it costs."""

    def __init__(self, events: EventQueue, latency_s: Callable[[SimNode, SimNode], float], mode: str) -> None:
        if mode not in ("gossip", "records"):
            raise ValueError(f"unknown libp2p mode {mode}")
        self.events = events
        self.latency_s = latency_s
        self.mode = mode
        self.by_peer_id: dict[str, SimNode] = {}
        self.traffic = Traffic()
        self.counting = True
        self.on_record_put: Callable[[SimNode, bytes], None] | None = None  # records mode
        self.lost_announce: set[int] = set()  # nodes outside the gossip mesh: their announcements are lost

    def add(self, node: SimNode) -> None:
        self.by_peer_id[node.host.peer_id] = node

    def live(self) -> list[SimNode]:
        return [n for n in self.by_peer_id.values() if n.alive]

    def deliver(self, src: SimNode, dst: SimNode, data: bytes, source: str, wire_bytes: int, origin: str = "") -> None:
        if self.counting:
            self.traffic.count(src.index, dst.index, wire_bytes)
        self.events.after(self.latency_s(src, dst), _arrive, dst, data, source, origin)


def _arrive(dst: SimNode, data: bytes, source: str, origin: str) -> None:
    if dst.alive and dst.receives:
        dst.discovery.receive(data, source, origin=origin)


def _arrive_exchange(dst: SimNode, data: bytes, peer_id: str) -> None:
    if dst.alive and dst.receives:
        dst.discovery.exchange.on_frame(data, peer_id)


class SimHost:
    """One node's libp2p host, as `Discovery` and the Publisher use it."""

    def __init__(self, net: SimNet, node: SimNode) -> None:
        self.net = net
        self.node = node
        self.peer_id = peer_id_for(node.node_id)
        self.connections: set[str] = set()  # peer ids
        self._addrs = [f"/ip4/{node.ip}/tcp/4001/p2p/{self.peer_id}"]

    @property
    def addrs(self) -> list[str]:
        return list(self._addrs)

    def publish(self, data: bytes) -> None:
        """gossip: every live node gets it once (after log_D n hops); each forwards D copies.
        records: no mesh-wide flood; the node's model records are put again with this advert."""
        net = self.net
        if self.node.index in net.lost_announce:
            return
        if net.mode == "records":
            if net.on_record_put is not None:
                net.on_record_put(self.node, data)
            return
        live = net.live()
        hops = tm.dht_hops(len(live)) // 2 + 1
        wire = tm.libp2p_bytes(len(data))
        for dst in live:
            if dst is self.node or dst.index in net.lost_announce:
                continue  # a lost node is in no gossipsub mesh: gossip neither leaves it nor reaches it
            if net.counting:
                net.traffic.add_sent(dst.index, wire * tm.GOSSIP_DEGREE / 2)  # forwards, shared among senders
                net.traffic.add_received(dst.index, wire * tm.GOSSIP_DEGREE / 2)
            net.events.after(hops * net.latency_s(self.node, dst), _arrive, dst, data, "libp2p", "")
        if net.counting:
            net.traffic.add_sent(self.node.index, wire * tm.GOSSIP_DEGREE)

    def send_direct(self, data: bytes, full: bool, skip: frozenset[str] = frozenset()) -> None:
        if len(data) > MAX_FRAME_BYTES:
            return
        wire = tm.libp2p_bytes(len(data))
        for pid in list(self.connections):
            dst = self.net.by_peer_id.get(pid)
            if dst is None or pid in skip:
                continue
            if not dst.alive:
                self.connections.discard(pid)  # the stream write fails: the connection is dropped
                continue
            self.net.deliver(self.node, dst, data, "libp2p", wire)

    @property
    def connected_peers(self) -> set[str]:
        return self.connections

    def send_to(self, peer_id: str, data: bytes) -> None:
        """An anti-entropy digest or answer to one connected peer (discovery/exchange.py)."""
        dst = self.net.by_peer_id.get(peer_id)
        if dst is None or peer_id not in self.connections or not dst.alive or len(data) > MAX_FRAME_BYTES:
            return
        if self.net.counting:
            self.net.traffic.count(self.node.index, dst.index, tm.libp2p_bytes(len(data)))
        self.net.events.after(self.net.latency_s(self.node, dst), _arrive_exchange, dst, data, self.peer_id)

    def connect(self, addr: str) -> None:
        """Dials a peer (if not connected, below MAX_CONNECTIONS); on the new connection each side
        sends its current full advert first (discovery/libp2p_direct.py), then heartbeats."""
        pid = addr.rsplit("/p2p/", 1)[-1]
        dst = self.net.by_peer_id.get(pid)
        if dst is None or dst is self.node or pid in self.connections or not dst.alive:
            return
        if len(self.connections) >= MAX_CONNECTIONS or len(dst.host.connections) >= MAX_CONNECTIONS:
            return
        self.connections.add(pid)
        dst.host.connections.add(self.peer_id)
        for a, b in ((self.node, dst), (dst, self.node)):
            data = a.discovery.signed_advert()
            self.net.deliver(a, b, data, "libp2p", tm.libp2p_bytes(len(data)))

    def drop_dead(self) -> None:
        self.connections = {p for p in self.connections if (n := self.net.by_peer_id.get(p)) is not None and n.alive}


class SimMulticast:
    """One node's LAN multicast socket: a datagram reaches every live node of its site."""

    def __init__(self, net: SimNet, node: SimNode, site_members: list[SimNode]) -> None:
        self.net = net
        self.node = node
        self.site_members = site_members
        self.sent_bytes = 0

    def send(self, data: bytes) -> None:
        wire = tm.multicast_bytes(len(data))
        self.sent_bytes += wire
        if self.net.counting:
            self.net.traffic.add_sent(self.node.index, wire)
        origin = self.node.http_address.rpartition(":")[0]
        for dst in self.site_members:
            if dst is not self.node and dst.alive:
                if self.net.counting:
                    self.net.traffic.add_received(dst.index, wire)
                self.net.events.after(self.net.latency_s(self.node, dst), _arrive, dst, data, "mdns", origin)
