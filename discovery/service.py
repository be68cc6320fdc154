"""Discovery: the node-owned service that signs our advert, runs the transports, feeds the PeerTable.

Every advert from any source goes through `receive()`, the single validation path. The service owns
seq, issued_at, ttl_s and our libp2p addresses; the node's `advert_source` supplies the rest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from discovery.advert import AdvertError, NodeAdvert
from discovery.beat import Beat, decode_message, encode_beat
from discovery.changes import significant_change
from discovery.envelope import derive_subkey, encode_signed
from discovery.fetch import FetchAdvert, FetchError, HttpAdvertFetcher
from discovery.lan import LanPeers
from discovery.lan_multicast import AdvertMulticast
from discovery.mdns import Mdns, mem_bucket
from discovery.netaddr import announce_ips
from discovery.peer_table import ApplyResult, Peer, PeerTable, TouchResult, freshness_error
from discovery.rejects import RejectCounter
from node.identity import Identity

if TYPE_CHECKING:
    from discovery.libp2p_host import Libp2pHost

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 10.0
DEFAULT_REFRESH_S = 2.5
EXPIRE_INTERVAL_S = 0.5
PUBLISH_DEBOUNCE_S = 0.2
GOODBYE_FLUSH_S = 0.2  # lets the goodbye leave over gossipsub before the host stops
# at rest a period sends a ~160 B heartbeat; the full advert goes out again (re-signed, so issued_at
# stays well inside peers' skew window) this often, to peers that lost it, directly and by multicast
FULL_REPUBLISH_S = 30.0
MAX_MISSED_FETCHES = 16  # adverts fetched at once because a heartbeat named a seq we do not have


class ChangeKind(Enum):
    JOINED = "joined"
    UPDATED = "updated"  # content changed (not just seq/issued_at)
    LEFT = "left"  # goodbye or expiry


@dataclass(frozen=True, slots=True)
class PeerChange:
    kind: ChangeKind
    node_id: str
    peer: Peer | None  # None when LEFT


def _port(hostport: str) -> int:
    try:
        return int(hostport.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return 0


def _same_content(a: NodeAdvert, b: NodeAdvert) -> bool:
    return dataclasses.replace(a, seq=b.seq, issued_at=b.issued_at) == b


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
        libp2p_port: int | None = None,
        bootstrap: Sequence[str] = (),
        host_ip: str = "127.0.0.1",
        fetch_advert: FetchAdvert | None = None,
        ttl_s: float = DEFAULT_TTL_S,
        refresh_s: float = DEFAULT_REFRESH_S,
        max_skew_s: float = 300.0,
    ) -> None:
        if not 0 < refresh_s < ttl_s:
            raise ValueError("need 0 < refresh_s < ttl_s so a live peer is refreshed before it expires")
        self._identity = identity
        self._mesh_key = mesh_key
        self._advert_source = advert_source
        self.table = table
        self._clock = clock
        self._use_mdns = mdns
        self._libp2p_port = libp2p_port
        self._bootstrap = list(bootstrap)
        self._host_ip = host_ip
        self._own_fetcher = HttpAdvertFetcher() if fetch_advert is None else None
        self._ttl_s = ttl_s
        self._refresh_s = refresh_s
        self._max_skew_s = max_skew_s
        self._rejects = RejectCounter(log)
        self._listeners: list[Callable[[PeerChange], None]] = []
        self._seq = 0
        self._signed: bytes | None = None
        self._signed_content: NodeAdvert | None = None  # what _signed says, for change detection
        self._full_sent_at = float("-inf")
        self._force_full = True
        self._issued_at = 0.0  # last issued_at we signed: kept strictly increasing (peers' replay guard)
        self._missed: dict[str, asyncio.Task[None]] = {}
        self._lan_heard: dict[str, float] = {}  # node id -> when last heard over LAN multicast/fetch
        self.beats_unknown = 0  # heartbeats from nodes not in the table (cannot be verified): ignored
        self._goodbye: bytes | None = None
        self._mdns: Mdns | None = None
        self._multicast: AdvertMulticast | None = None
        self._libp2p: Libp2pHost | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._publish_wake = asyncio.Event()
        self._fetch: FetchAdvert = fetch_advert or self._own_fetcher  # type: ignore[assignment]
        self._lan = LanPeers(
            self._fetch,
            receive=lambda data: self.receive(data, "mdns"),
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
        if self._signed is None:
            self._sign_current()
        assert self._signed is not None
        return self._signed

    def publish_soon(self) -> None:
        """Debounced push of a fresh full advert (new seq) everywhere, mDNS TXT if the bucket moved."""
        self._force_full = True
        self._publish_wake.set()

    async def start(self) -> None:
        advert = self._advert_source()
        if self._libp2p_port is not None:
            # py-libp2p costs about 0.5 s to import: an mDNS-only node never pays it
            from discovery.libp2p_host import Libp2pHost

            psk = derive_subkey(self._mesh_key, "libp2p-pnet").hex()
            self._libp2p = Libp2pHost(
                self._identity,
                lambda data: self.receive(data, "libp2p"),
                listen_ip=self._host_ip,
                announce_ips=announce_ips(self._host_ip),
                port=self._libp2p_port,
                bootstrap=self._bootstrap,
                psk_hex=psk,
            )
            await self._libp2p.start()
        self._sign_current()
        if self._use_mdns:
            self._mdns = Mdns(
                self._identity.node_id,
                announce_ips(self._host_ip),
                _port(advert.addresses.http),
                _port(advert.addresses.grpc),
                self._bucket(advert),
                on_found=self._lan.on_found,
                on_removed=self._lan.on_removed,
            )
            self._lan.mdns = self._mdns
            await self._mdns.async_start()
            await self._start_multicast()
        self._tasks = [
            asyncio.create_task(self._expire_loop(), name="discovery-expire"),
            asyncio.create_task(self._publish_loop(), name="discovery-publish"),
        ]
        if self._mdns is not None:
            self._tasks.append(asyncio.create_task(self._lan.refresh_loop(), name="discovery-lan"))
        self.publish_soon()

    async def stop(self) -> None:
        """Says goodbye (signed over gossipsub, unregister over mDNS), then stops every transport."""
        for task in [*self._tasks, *self._missed.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._missed.values(), return_exceptions=True)
        await self._lan.stop()
        self._tasks = []
        self._goodbye = self._sign(ttl_s=0.0)
        if self._multicast is not None:
            self._multicast.send(self._goodbye)
            await self._multicast.async_stop()
            self._multicast = None
        if self._libp2p is not None:
            self._libp2p.publish(self._goodbye)
            await asyncio.sleep(GOODBYE_FLUSH_S)
            await self._libp2p.stop()
            self._libp2p = None
        if self._mdns is not None:
            await self._mdns.async_stop()
            self._mdns = None
        if self._own_fetcher is not None:
            await self._own_fetcher.close()

    def receive(self, data: bytes, source: str) -> bool:
        """Validates one advert from any source and applies it; True when the table accepted it."""
        try:
            advert = decode_message(data, self._mesh_key)
        except AdvertError as e:
            self._rejects.reject(e.reason, source, e.detail)
            return False
        if isinstance(advert, Beat):
            accepted = self._receive_beat(advert, source)
            if accepted and source == "mdns":
                self._note_lan(advert.node_id)
            return accepted
        now = self._clock()
        skew = freshness_error(advert, now, self._max_skew_s)
        if skew is not None:
            self._rejects.reject(skew, source, advert.node_id)
            return False
        if advert.ttl_s == 0:
            return self._receive_goodbye(advert, source)
        old = self.table.get(advert.node_id)
        result = self.table.apply(advert, now, source)
        if result is ApplyResult.STALE:
            self._rejects.reject("replayed_seq", source, advert.node_id)
        elif result is ApplyResult.FULL:
            self._rejects.reject("table_full", source, advert.node_id)
        elif result is ApplyResult.NEW:
            self._emit(ChangeKind.JOINED, advert.node_id)
            if self._libp2p is not None:
                for addr in advert.addresses.libp2p:
                    self._libp2p.connect(addr)
                if source == "libp2p":
                    self.publish_soon()  # the newcomer learns about us now, not at the next period
        elif result is ApplyResult.UPDATED and old is not None and not _same_content(old.advert, advert):
            self._emit(ChangeKind.UPDATED, advert.node_id)
        if result.accepted and source == "mdns":
            self._note_lan(advert.node_id)
        return result.accepted

    def _note_lan(self, node_id: str) -> None:
        if node_id in self._lan_heard or len(self._lan_heard) < self.table.max_peers:
            self._lan_heard[node_id] = self._clock()

    def _lan_peer_ids(self) -> frozenset[str]:
        """libp2p peer ids of peers we heard on the LAN lately: they hear our multicast beats too
        (same link), so our direct libp2p beats to them would only be duplicates."""
        now, ids = self._clock(), set()
        for node_id, at in list(self._lan_heard.items()):
            peer = self.table.get(node_id)
            if peer is None or now - at > 2 * self._refresh_s:
                if peer is None:
                    del self._lan_heard[node_id]
                continue
            ids.update(addr.rsplit("/p2p/", 1)[-1] for addr in peer.advert.addresses.libp2p)
        return frozenset(ids)

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
        peer = self.table.get(beat.node_id)
        assert peer is not None
        if not beat.verify(peer.advert.public_key):  # node id -> key is fixed, whatever the seq
            self._rejects.reject("bad_signature", source, beat.node_id)
            return False
        if result is TouchResult.NEWER_SEQ:
            self._fetch_missed(peer)
            return False
        return self.table.touch(beat.node_id, beat.seq, beat.issued_at, now) is TouchResult.REFRESHED

    def _fetch_missed(self, peer: Peer) -> None:
        """A verified beat names a newer advert than ours (its push was lost): fetch it over HTTP."""
        node_id = peer.advert.node_id
        host, _, port = peer.advert.addresses.http.rpartition(":")
        fetch = self._fetch
        if node_id in self._missed or len(self._missed) >= MAX_MISSED_FETCHES or not host:
            return

        async def fetch_one() -> None:
            try:
                self.receive(
                    await fetch(host, _port(f":{port}"), _port(peer.advert.addresses.grpc)), "libp2p"
                )
            except (FetchError, OSError, TimeoutError) as e:
                log.debug("fetching the missed advert of %s failed: %r", node_id, e)

        task = asyncio.create_task(fetch_one(), name=f"discovery-missed-{node_id[:8]}")
        self._missed[node_id] = task
        task.add_done_callback(lambda _t: self._missed.pop(node_id, None))

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

    def _content(self) -> NodeAdvert:
        """Our advert as the node describes it now, with the fields the service owns filled in."""
        advert = dataclasses.replace(
            self._advert_source(),
            node_id=self._identity.node_id,
            public_key=self._identity.public_key_raw,
            seq=self._seq,
            issued_at=self._issued_at,
            ttl_s=self._ttl_s,
        )
        if self._libp2p is not None:
            advert = dataclasses.replace(
                advert, addresses=dataclasses.replace(advert.addresses, libp2p=tuple(self._libp2p.addrs))
            )
        return advert

    def _next_issued_at(self) -> float:
        self._issued_at = max(self._clock(), self._issued_at + 1e-3)
        return self._issued_at

    def _sign(self, ttl_s: float, content: NodeAdvert | None = None) -> bytes:
        issued_at = self._next_issued_at()
        # seq starts at wall-clock milliseconds so it keeps growing across restarts of the node
        self._seq = max(self._seq + 1, int(issued_at * 1000))
        advert = dataclasses.replace(
            content or self._content(), seq=self._seq, issued_at=issued_at, ttl_s=ttl_s
        )
        return encode_signed(advert, self._identity, self._mesh_key)

    def _sign_current(self, content: NodeAdvert | None = None) -> None:
        content = content or self._content()
        self._signed = self._sign(self._ttl_s, content)
        self._signed_content = content

    async def _start_multicast(self) -> None:
        """LAN refresh by multicast (one datagram per period, whatever the mesh size); HTTP otherwise."""
        multicast = AdvertMulticast(announce_ips(self._host_ip), lambda data: self.receive(data, "mdns"))
        try:
            await multicast.async_start()
        except OSError as e:
            log.warning("advert multicast unavailable (%s): refreshing LAN peers over HTTP only", e)
            await multicast.async_stop()
            return
        self._multicast = multicast

    @staticmethod
    def _bucket(advert: NodeAdvert) -> int:
        r = advert.resources
        return mem_bucket(r.vram_free_bytes if r.vram_total_bytes else r.ram_free_bytes)

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRE_INTERVAL_S)
            for node_id in self.table.expire(self._clock()):
                self._emit(ChangeKind.LEFT, node_id)

    def _publish_once(self) -> None:
        """One period: a new full advert if it changed (gossipsub too), the same one every
        FULL_REPUBLISH_S (re-signed), otherwise a heartbeat; directly to libp2p peers and by multicast."""
        content = self._content()
        old = self._signed_content
        changed = self._force_full or self._signed is None or old is None or significant_change(old, content)
        due = self._clock() - self._full_sent_at >= FULL_REPUBLISH_S
        self._force_full = False
        if changed or due:
            self._sign_current(content)
            self._full_sent_at = self._clock()
            data, full = self._signed, True
        else:
            data, full = encode_beat(self._identity, self._mesh_key, self._seq, self._next_issued_at()), False
        assert data is not None
        if self._libp2p is not None:
            if changed:
                self._libp2p.publish(data)  # relayed to peers we have no connection to
            self._libp2p.send_direct(data, full, skip=frozenset() if full else self._lan_peer_ids())
        if self._multicast is not None:
            self._multicast.send(data)

    async def _publish_loop(self) -> None:
        """A heartbeat or advert every refresh_s, a new advert soon (debounced) after publish_soon()."""
        while True:
            try:
                await asyncio.wait_for(self._publish_wake.wait(), self._refresh_s)
                await asyncio.sleep(PUBLISH_DEBOUNCE_S)
            except TimeoutError:
                pass
            self._publish_wake.clear()
            self._publish_once()
            if self._mdns is not None:
                await self._mdns.async_update_bucket(self._bucket(self._advert_source()))
