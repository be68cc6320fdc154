"""Discovery: the node-owned service that signs our advert, runs the transports, feeds the PeerTable.

Every advert from any source goes through `receive()`, the single validation path. Signing and the
publishing schedule (seq, issued_at, ttl_s, our libp2p addresses) are the Publisher's
(discovery/publisher.py); the node's `advert_source` supplies the rest of the advert.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from discovery.advert import AdvertError, NodeAdvert
from discovery.beat import Beat, decode_message
from discovery.changes import comes_from, same_content
from discovery.exchange import AntiEntropy
from discovery.fetch import FetchAdvert, HttpAdvertFetcher
from discovery.identity import Identity
from discovery.lan import LanPeers
from discovery.lan_multicast import AdvertMulticast, start_multicast
from discovery.mdns import Mdns
from discovery.missed import MissedAdverts
from discovery.model_lookup import ModelLookups
from discovery.netaddr import announce_ips, port_of
from discovery.peer_change import ChangeKind, PeerChange
from discovery.peer_table import ApplyResult, Peer, PeerTable, TouchResult, freshness_error
from discovery.publisher import Publisher, advert_bucket
from discovery.rejects import RejectCounter

if TYPE_CHECKING:
    from discovery.libp2p_host import Libp2pHost

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 10.0
DEFAULT_REFRESH_S = 2.5
EXPIRE_INTERVAL_S = 0.5
STOP_TASKS_TIMEOUT_S = 2.0
GOODBYE_FLUSH_S = 0.2  # lets the goodbye leave over gossipsub before the host stops


class Discovery:
    def __init__(
        self,
        identity: Identity,
        mesh_key: bytes,
        advert_source: Callable[[], NodeAdvert],
        table: PeerTable,
        *,
        clock: Callable[[], float] = time.time,
        mdns: bool = True,
        multicast: bool = True,
        allow_nodes: frozenset[str] | None = None,
        libp2p_port: int | None = None,
        bootstrap: Sequence[str] = (),
        host_ip: str = "127.0.0.1",
        fetch_advert: FetchAdvert | None = None,
        ttl_s: float = DEFAULT_TTL_S,
        refresh_s: float = DEFAULT_REFRESH_S,
        max_skew_s: float = 300.0,
        records: bool = False,
    ) -> None:
        """`records`: libp2p past one LAN finds holders through model-keyed DHT records
        (lookup_model) and dials only a sample of peers and what it looked up; no gossipsub flood."""
        if not 0 < refresh_s < ttl_s:
            raise ValueError("need 0 < refresh_s < ttl_s so a live peer is refreshed before it expires")
        self._identity = identity
        self._mesh_key = mesh_key
        self._advert_source = advert_source
        self.table = table
        self._clock = clock
        self._use_mdns = mdns  # zeroconf on the announced interfaces (a LAN, or loopback in tests)
        self._use_multicast = multicast  # signed adverts by UDP multicast on the announced interfaces
        self._allow_nodes = allow_nodes  # None: any member; else only these node ids are admitted
        self._libp2p_port = libp2p_port
        self._records = records
        self._bootstrap = list(bootstrap)
        self._host_ip = host_ip
        self._own_fetcher: HttpAdvertFetcher | None = None
        if fetch_advert is None:
            self._own_fetcher = fetch_advert = HttpAdvertFetcher()
        self._max_skew_s = max_skew_s
        self._rejects = RejectCounter(log)
        self._listeners: list[Callable[[PeerChange], None]] = []
        self._publisher = Publisher(
            identity, mesh_key, advert_source, table, clock=clock, ttl_s=ttl_s, refresh_s=refresh_s
        )
        self.beats_unknown = 0  # heartbeats from nodes not in the table (cannot be verified): ignored
        self.received: dict[str, int] = {}  # adverts and heartbeats handed to receive(), by source (ours)
        self.received_bytes = 0
        self._goodbye: bytes | None = None
        self._mdns: Mdns | None = None
        self._multicast: AdvertMulticast | None = None
        self._libp2p: Libp2pHost | None = None
        self.lookups = ModelLookups()  # records mode: its send is the host's lookup once it runs
        self._tasks: list[asyncio.Task[None]] = []
        self._missed = MissedAdverts(fetch_advert, lambda data: self.receive(data, "libp2p"))
        self._fetch_missed: Callable[[Peer], None] = self._missed.fetch
        # anti-entropy at rest (libp2p, not records mode): a digest to one direct peer per period
        self.exchange = AntiEntropy(table, clock, lambda data: self.receive(data, "relay"),
                                    lambda reason, detail: self._rejects.reject(reason, "libp2p", detail))
        self._lan = LanPeers(
            fetch_advert,
            receive=lambda data, origin: self.receive(data, "mdns", origin=origin, fetched=True),
            goodbye=self._drop,
            seen_s=self._seen_s,
            refresh_s=refresh_s,
            reject=lambda reason, detail: self._rejects.reject(reason, "mdns", detail),
        )

    # --- public surface -----------------------------------------------------------------------------

    @property
    def libp2p_addrs(self) -> list[str]:
        return self._libp2p.addrs if self._libp2p is not None else []

    @property
    def fetch_failures(self) -> int:
        return self._lan.fetch_failures

    @property
    def advert_fetches(self) -> int:
        """HTTP advert fetches made (on discovery, removal, and for peers not refreshed otherwise)."""
        return self._lan.fetches

    @property
    def multicast_sent_bytes(self) -> int:
        """Bytes of adverts and heartbeats sent by multicast (libp2p and mDNS keep no count)."""
        return self._multicast.sent_bytes if self._multicast is not None else 0

    @property
    def rejects(self) -> dict[str, int]:
        return self._rejects.snapshot()

    def on_change(self, callback: Callable[[PeerChange], None]) -> None:
        """Registers a callback run on the event loop for every peer joined/updated/left."""
        self._listeners.append(callback)

    def signed_advert(self) -> bytes:
        """Our current signed advert: what GET /mesh/advert and gRPC GetAdvert return.

        Re-signed (seq+1) when its content changes and every FULL_REPUBLISH_S; after stop() it is
        the signed goodbye, so a peer checking on a vanished mDNS record learns we left.
        """
        if self._goodbye is not None:
            return self._goodbye
        return self._publisher.signed_advert()

    def publish_soon(self) -> None:
        """Debounced push of a fresh full advert (new seq) everywhere, mDNS TXT if the bucket moved."""
        self._publisher.publish_soon()

    def load_changed(self) -> None:
        """Our load moved: a bounded load advert (Publisher.load_changed), not one per request."""
        self._publisher.load_changed()

    def lookup_model(self, model: str) -> None:
        """Records mode: looks the holders of a model (alias or digest) up in the DHT, throttled
        (model_lookup.py); their adverts arrive through receive() and they are dialed. Else a no-op."""
        self.lookups.lookup(model, self._clock())

    def use_transports(
        self,
        libp2p: Libp2pHost | None,
        multicast: AdvertMulticast | None,
        fetch_missed: Callable[[Peer], None],
    ) -> None:
        """Runs over transports driven from outside instead of start() (the simulator's, on its own
        clock): it calls `publisher.publish_once()` each period and `expire_now()` as the node would."""
        self._libp2p = self._publisher.libp2p = libp2p
        self.exchange.host = None if self._records else libp2p
        self._multicast = self._publisher.multicast = multicast
        self._fetch_missed = fetch_missed

    @property
    def publisher(self) -> Publisher:
        return self._publisher

    def expire_now(self) -> list[str]:
        """Drops the peers whose ttl ran out (what the expire loop does every EXPIRE_INTERVAL_S)."""
        gone = self.table.expire(self._clock())
        for node_id in gone:
            self._emit(ChangeKind.LEFT, node_id)
        return gone

    async def start(self) -> None:
        advert = self._advert_source()
        if self._libp2p_port is not None:
            # py-libp2p costs about 0.5 s to import: an mDNS-only node never pays it
            from discovery.libp2p_host import start_host

            self._libp2p = await start_host(self._identity, self._mesh_key, lambda data: self.receive(data, "libp2p"),
                                            self._host_ip, self._libp2p_port, self._bootstrap, records=self._records,
                                            on_record=lambda data: self.receive(data, "dht"),
                                            on_exchange=self.exchange.on_frame)
            self._publisher.libp2p = self._libp2p
            self.exchange.host = None if self._records else self._libp2p
            self._publisher.records = self._records
            if self._records:
                self.lookups.send = self._libp2p.lookup
        self._publisher.sign_current()
        if self._use_mdns:
            self._mdns = Mdns(
                self._identity.node_id,
                announce_ips(self._host_ip),
                port_of(advert.addresses.http),
                port_of(advert.addresses.grpc),
                advert_bucket(advert),
                on_found=self._lan.on_found,
                on_removed=self._lan.on_removed,
            )
            self._lan.mdns = self._publisher.mdns = self._mdns
            await self._mdns.async_start()
        if self._use_multicast:
            # on loopback it is the whole of discovery (no zeroconf): a default node hears nothing from
            # the LAN and tells it nothing
            self._multicast = self._publisher.multicast = await start_multicast(
                announce_ips(self._host_ip),
                lambda data, sender: self.receive(data, "mdns", origin=sender),
                lambda reason, detail: self._rejects.reject(reason, "mdns", detail),
            )
        self._tasks = [
            asyncio.create_task(self._expire_loop(), name="discovery-expire"),
            asyncio.create_task(self._publisher.run(), name="discovery-publish"),
        ]
        if self._mdns is not None:
            self._tasks.append(asyncio.create_task(self._lan.refresh_loop(), name="discovery-lan"))
        if self.exchange.host is not None:
            self._tasks.append(asyncio.create_task(self.exchange.run(), name="discovery-exchange"))
        self.publish_soon()

    async def stop(self) -> None:
        """Says goodbye (signed over gossipsub, unregister over mDNS), then stops every transport."""
        for task in self._tasks:
            task.cancel()
        log.debug("stop: tasks")
        pending = [*self._tasks, *self._missed.cancel()]
        if pending:
            # Bounded: a task that swallowed its cancellation must not keep the node from exiting.
            _, stuck = await asyncio.wait(pending, timeout=STOP_TASKS_TIMEOUT_S)
            for task in stuck:
                log.warning("discovery task %s did not stop when cancelled", task.get_name())
        log.debug("stop: lan fetches")
        await self._lan.stop()
        self._tasks = []
        log.debug("stop: goodbye")
        self._goodbye = self._publisher.sign_goodbye()
        if self._multicast is not None:
            self._multicast.send(self._goodbye)
            log.debug("stop: multicast")
            await self._multicast.async_stop()
            self._multicast = self._publisher.multicast = None
        if self._libp2p is not None:
            self.exchange.host = None
            self._libp2p.publish(self._goodbye)
            await asyncio.sleep(GOODBYE_FLUSH_S)
            await self._libp2p.stop()
            self._libp2p = self._publisher.libp2p = self.lookups.send = None
        if self._mdns is not None:
            log.debug("stop: mdns")
            await self._mdns.async_stop()
            self._mdns = self._publisher.mdns = None
        if self._own_fetcher is not None:
            await self._own_fetcher.close()

    def receive(self, data: bytes, source: str, *, origin: str = "", fetched: bool = False) -> bool:
        """Validates one advert from any source and applies it; True when the table accepted it.

        `origin`: the "host" or "host:port" the bytes came from when the transport knows it (a
        multicast datagram's sender, the address an advert was fetched from). An advert whose own
        HTTP address matches its origin is *verified* (PeerTable keeps it over unverified ones). A
        `fetched` advert must match: an mDNS pointer cannot make us take an advert from elsewhere.
        """
        self.received[source] = self.received.get(source, 0) + 1  # sources are our own few names
        self.received_bytes += len(data)
        try:
            advert = decode_message(data, self._mesh_key)
        except AdvertError as e:
            self._rejects.reject(e.reason, source, e.detail)
            return False
        if isinstance(advert, Beat):
            accepted = self._receive_beat(advert, source)
            if accepted and source == "mdns":
                self._publisher.note_lan(advert.node_id)
            return accepted
        now = self._clock()
        skew = freshness_error(advert, now, self._max_skew_s)
        if skew is not None:
            self._rejects.reject(skew, source, advert.node_id)
            return False
        if self._allow_nodes is not None and advert.node_id not in self._allow_nodes:
            if advert.node_id != self._identity.node_id:
                self._rejects.reject("not_allowed", source, advert.node_id)
            return False
        verified = comes_from(advert, origin)
        if fetched and not verified:
            self._rejects.reject("address_mismatch", source, f"{advert.node_id} fetched from {origin}")
            return False
        if advert.ttl_s == 0:
            return self._receive_goodbye(advert, source)
        old = self.table.get(advert.node_id)
        result = self.table.apply(advert, now, source, verified=verified)
        for node_id in self.table.take_evicted():
            self._emit(ChangeKind.LEFT, node_id)
        if result in (ApplyResult.NEW, ApplyResult.UPDATED):
            self.exchange.note(advert, data)  # relayed unchanged to peers whose digest lacks it
        if result is ApplyResult.STALE:
            # a record is put every 60 s, re-signed adverts go out every 30 s: older copies there are
            # normal; a relay may race the owner's own newer advert
            if source not in ("dht", "relay"):
                self._rejects.reject("replayed_seq", source, advert.node_id)
        elif result is ApplyResult.FULL:
            self._rejects.reject("table_full", source, advert.node_id)
        elif result is ApplyResult.HOST_FULL:
            self._rejects.reject("host_full", source, advert.node_id)
        elif result is ApplyResult.NEW:
            self._emit(ChangeKind.JOINED, advert.node_id)
            if source in ("libp2p", "mdns"):
                self._publisher.met_peer()  # the newcomer learns about us now, not in 30 s
            if self._libp2p is not None and not self._records:  # records mode: lookups dial
                for addr in advert.addresses.libp2p:
                    self._libp2p.connect(addr)
        elif result is ApplyResult.UPDATED and old is not None and not same_content(old.advert, advert):
            self._emit(ChangeKind.UPDATED, advert.node_id)
            if old.advert.tls_cert != advert.tls_cert and source in ("libp2p", "mdns"):
                self._publisher.introduce_soon()  # it restarted: its server trusts only members it has heard of
        if result.accepted and source == "mdns":
            self._publisher.note_lan(advert.node_id)
        return result.accepted

    # --- internals ----------------------------------------------------------------------------------

    def _receive_beat(self, beat: Beat, source: str) -> bool:
        """A heartbeat: refreshes last_seen of a peer whose current advert has the beat's seq."""
        now = self._clock()
        skew = freshness_error(beat, now, self._max_skew_s)
        if skew is not None:
            self._rejects.reject(skew, source, beat.node_id)
            return False
        result = self.table.peek_touch(beat.node_id, beat.seq, beat.issued_at)
        if result is TouchResult.UNKNOWN:
            self.beats_unknown += 1  # its full advert comes on connect, on change, or within 30 s
            return False
        if result is TouchResult.STALE:
            self._rejects.reject("replayed_seq", source, beat.node_id)
            return False
        if result in (TouchResult.SELF, TouchResult.DUPLICATE):
            return False
        peer = self.table.held(beat.node_id)  # live, or expired here (EXPIRED, or NEWER_SEQ after it)
        assert peer is not None
        if not beat.verify(peer.advert.public_key):  # node id -> key is fixed, whatever the seq
            self._rejects.reject("bad_signature", source, beat.node_id)
            return False
        if result is TouchResult.NEWER_SEQ:
            self._fetch_missed(peer)  # the beat names an advert newer than ours: its push was lost
            return False
        result = self.table.touch(beat.node_id, beat.seq, beat.issued_at, now, beat.load)
        for node_id in self.table.take_evicted():
            self._emit(ChangeKind.LEFT, node_id)
        if result is TouchResult.REVIVED:  # it expired here (a starved loop), not left: back at once
            self._emit(ChangeKind.JOINED, beat.node_id)
        return result in (TouchResult.REFRESHED, TouchResult.REVIVED)

    def _receive_goodbye(self, advert: NodeAdvert, source: str) -> bool:
        peer = self.table.get(advert.node_id)
        if peer is None or advert.node_id == self._identity.node_id:
            return False
        if advert.seq <= peer.advert.seq:
            self._rejects.reject("replayed_seq", source, advert.node_id)
            return False
        self._drop(advert.node_id)
        return True

    def _drop(self, node_id: str) -> None:
        if self.table.goodbye(node_id):
            self._emit(ChangeKind.LEFT, node_id)

    def _seen_s(self, node_id: str) -> float | None:
        peer = self.table.get(node_id)
        return None if peer is None else peer.last_seen_s(self._clock())

    def _emit(self, kind: ChangeKind, node_id: str) -> None:
        change = PeerChange(kind, node_id, self.table.get(node_id))
        for callback in self._listeners:
            try:
                callback(change)
            except Exception:  # a listener's bug must not break membership
                log.exception("discovery on_change listener failed")

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRE_INTERVAL_S)
            self.expire_now()
