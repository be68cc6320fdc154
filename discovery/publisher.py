"""Publisher: signs our advert and sends it, or a heartbeat, every period over every transport.

Owns seq and issued_at (both strictly increasing), the last signed advert, and the schedule: a new
full advert when the content changed significantly or `publish_soon()` was called (debounced), the
same content re-signed every FULL_REPUBLISH_S, otherwise a ~160 B heartbeat.

Load (requests active/queued) changes on every request start and end. It rides on heartbeats: a
beat carries the load whenever it differs from the signed advert's (discovery/beat.py), and a change
of load alone never makes a new full advert. `load_changed()` sends an extra beat at once only when
the coarse level (`load_level`) moved and no load beat went out in the last MIN_LOAD_ADVERT_S (else
when that interval ends); any other change of the exact counts rides on the next periodic beat.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from discovery.advert import Load, NodeAdvert
from discovery.beat import encode_beat
from discovery.changes import significant_change
from discovery.envelope import encode_signed
from discovery.identity import Identity
from discovery.lan_multicast import AdvertMulticast
from discovery.mdns import Mdns, mem_bucket
from discovery.model_records import RECORD_REPUT_S, model_keys
from discovery.peer_table import PeerTable

if TYPE_CHECKING:
    from discovery.libp2p_host import Libp2pHost

PUBLISH_DEBOUNCE_S = 0.2
# at rest a period sends a ~160 B heartbeat; the full advert goes out again (re-signed, so issued_at
# stays well inside peers' skew window) this often, to peers that lost it, directly and by multicast
FULL_REPUBLISH_S = 30.0
# a change of load alone is pushed in full at most this often (per node, to its connected peers)
MIN_LOAD_ADVERT_S = 1.0
ANNOUNCE_S = 10.0  # after meeting its first peer, a node gossips its advert on each peer it meets (met_peer)


def load_level(load: Load) -> int:
    """Coarse load, what routing acts on: 0 idle, 1 under half the slots busy, 2 half or more,
    3 saturated (every slot busy or requests queued)."""
    busy, capacity = load.active + load.queued, max(1, load.capacity)
    if busy == 0:
        return 0
    if busy >= capacity or load.queued > 0:
        return 3
    return 1 if 2 * busy < capacity else 2


def publish_kind(
    old: NodeAdvert | None,
    new: NodeAdvert,
    *,
    last_load: Load | None,
    forced: bool,
    periodic: bool,
    now: float,
    full_sent_at: float,
    load_sent_at: float,
    introduce: bool = False,
) -> str:
    """What one publish sends, pure: "change" (a new full advert, gossiped too), "full" (the same
    content re-signed, FULL_REPUBLISH_S after the last), "beat", "load" (a beat off the period: the
    load level moved since `last_load`, what peers last heard), "defer" (it moved too soon after the last
    load beat: publish again at load_sent_at + MIN_LOAD_ADVERT_S; on a period, a beat) or "none"."""
    if forced or old is None:
        return "change"
    if significant_change(old, dataclasses.replace(new, load=old.load)):
        # free memory alone moved: our peers hear it directly, the mesh is not flooded with it (on a
        # 32-process box, free memory swings set off 0.1 floods per node per second)
        same_free = dataclasses.replace(new, load=old.load, resources=old.resources)
        return "change" if significant_change(old, same_free) else "full"
    if introduce:  # a peer must hear our advert: to our connected peers and the LAN, never a flood
        return "full"
    if periodic:
        return "full" if now - full_sent_at >= FULL_REPUBLISH_S else "beat"
    if load_level(last_load or old.load) != load_level(new.load):
        return "load" if now - load_sent_at >= MIN_LOAD_ADVERT_S - 1e-6 else "defer"  # float slack
    return "none"


def advert_bucket(advert: NodeAdvert) -> int:
    """The mDNS TXT memory bucket of an advert: free VRAM on a GPU node, free RAM otherwise."""
    r = advert.resources
    return mem_bucket(r.vram_free_bytes if r.vram_total_bytes else r.ram_free_bytes)


class Publisher:
    """Publishes through the transports Discovery sets on it (`libp2p`, `multicast`, `mdns`) as they
    start and clears as they stop; with none set it only signs (GET /mesh/advert still works)."""

    def __init__(
        self,
        identity: Identity,
        mesh_key: bytes,
        advert_source: Callable[[], NodeAdvert],
        table: PeerTable,
        *,
        clock: Callable[[], float],
        ttl_s: float,
        refresh_s: float,
    ) -> None:
        self._identity = identity
        self._mesh_key = mesh_key
        self._advert_source = advert_source
        self._table = table
        self._clock = clock
        self._ttl_s = ttl_s
        self._refresh_s = refresh_s
        self.libp2p: Libp2pHost | None = None
        self.multicast: AdvertMulticast | None = None
        self.mdns: Mdns | None = None
        # records mode (libp2p past one LAN): a changed advert goes into model-keyed DHT records
        # (put again every RECORD_REPUT_S), not into a gossipsub flood
        self.records = False
        self._records_put_at = float("-inf")
        self._seq = 0
        self._signed: bytes | None = None
        self._signed_content: NodeAdvert | None = None  # what _signed says, for change detection
        self._full_sent_at = float("-inf")
        self._load_sent_at = float("-inf")
        self._load_due_at: float | None = None  # a deferred load beat may go out at this time
        self._beat_load: Load | None = None  # the load our last beat carried since the last advert
        self._force_full = True
        self._introduce = False  # introduce_soon(): a full advert, direct and multicast only
        self._announce_until: float | None = None  # ANNOUNCE_S after the first peer we met
        self._issued_at = 0.0  # last issued_at we signed: kept strictly increasing (peers' replay guard)
        self._lan_heard: dict[str, float] = {}  # node id -> when last heard over LAN multicast/fetch
        self._wake = asyncio.Event()
        # called by publish_soon(): a driver other than run() (the simulator's clock) schedules
        # publish_once() PUBLISH_DEBOUNCE_S later, as run() would
        self.on_wake: Callable[[], None] | None = None

    def signed_advert(self) -> bytes:
        """Our current signed advert, signed now if it never was."""
        if self._signed is None:
            self.sign_current()
        assert self._signed is not None
        return self._signed

    def sign_current(self, content: NodeAdvert | None = None) -> None:
        content = content or self._content()
        self._signed = self._sign(self._ttl_s, content)
        self._signed_content = content
        self._beat_load = None

    def current_content(self) -> NodeAdvert:
        """Our advert as the node describes it now, with the current seq and issued_at (unsigned)."""
        return self._content()

    def sign_goodbye(self) -> bytes:
        """Our advert with ttl_s=0 (new seq): peers drop us on it."""
        return self._sign(ttl_s=0.0)

    def publish_soon(self) -> None:
        """Debounced push of a fresh full advert (new seq) everywhere, mDNS TXT if the bucket moved."""
        self._force_full = True
        self._wake.set()
        if self.on_wake is not None:
            self.on_wake()

    def met_peer(self) -> None:
        """A peer we did not know appeared. For ANNOUNCE_S after the first one we gossip our advert on
        each (how a newcomer tells the whole mesh who it is: repeated, since the first gossip often
        leaves before gossipsub knows a peer of ours on the topic); later one only gets it directly: it
        is a newcomer announcing itself, or a peer that expired us. (Gossiping on every one cost N x D
        adverts per peer met: at 16 processes on 2 cores, peers expiring on the starved box and coming
        back made such floods most of the traffic at rest; one gossip per 5 s instead left a 16-process
        mesh unformed after 76 s.)"""
        now = self._clock()
        if self._announce_until is None:
            self._announce_until = now + ANNOUNCE_S
        if now < self._announce_until:
            self.publish_soon()
        else:
            self.introduce_soon()

    def introduce_soon(self) -> None:
        """Debounced: our advert (re-signed, same content) to connected peers and by LAN multicast, not
        gossiped: a peer that met us, restarted or expired us must hear it, the mesh need not."""
        self._introduce = True
        self._wake.set()
        if self.on_wake is not None:
            self.on_wake()

    def load_changed(self) -> None:
        """Our load moved (a request started or ended): published as `publish_kind` decides, bounded
        to one full advert per MIN_LOAD_ADVERT_S, not one per request."""
        self._wake.set()
        if self.on_wake is not None:
            self.on_wake()

    def load_due_at(self) -> float | None:
        """When a deferred load advert may go out (the driver calls publish_once(periodic=False) then)."""
        return self._load_due_at

    def note_lan(self, node_id: str) -> None:
        """node_id was heard over LAN multicast or fetch: it hears our multicast too."""
        if node_id in self._lan_heard or len(self._lan_heard) < self._table.max_peers:
            self._lan_heard[node_id] = self._clock()

    async def run(self) -> None:
        """A heartbeat or advert every refresh_s, a new advert soon (debounced) after publish_soon(),
        load adverts as publish_kind decides after load_changed()."""
        loop = asyncio.get_running_loop()
        next_tick = loop.time() + self._refresh_s
        while True:
            wait_s = next_tick - loop.time()
            if self._load_due_at is not None:
                wait_s = min(wait_s, self._load_due_at - self._clock())
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that
                # lands as the event fires, and then stop() waited on this loop forever.
                async with asyncio.timeout(max(0.0, wait_s)):
                    await self._wake.wait()
                await asyncio.sleep(PUBLISH_DEBOUNCE_S)
            except TimeoutError:
                pass
            self._wake.clear()
            periodic = loop.time() >= next_tick
            if self.publish_once(periodic=periodic) or periodic:
                next_tick = loop.time() + self._refresh_s
            if self.mdns is not None:
                await self.mdns.async_update_bucket(advert_bucket(self._advert_source()))

    # --- internals ----------------------------------------------------------------------------------

    def _lan_peer_ids(self) -> frozenset[str]:
        """libp2p peer ids of peers we heard on the LAN lately: they hear our multicast beats too
        (same link), so our direct libp2p beats to them would only be duplicates."""
        now, ids = self._clock(), set[str]()
        for node_id, at in list(self._lan_heard.items()):
            peer = self._table.get(node_id)
            if peer is None or now - at > 2 * self._refresh_s:
                if peer is None:
                    del self._lan_heard[node_id]
                continue
            ids.update(addr.rsplit("/p2p/", 1)[-1] for addr in peer.advert.addresses.libp2p)
        return frozenset(ids)

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
        if self.libp2p is not None:
            advert = dataclasses.replace(
                advert, addresses=dataclasses.replace(advert.addresses, libp2p=tuple(self.libp2p.addrs))
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

    def _beat(self, load: Load, now: float, off_period: bool) -> bytes:
        """A beat, with our load when it differs from the signed advert's (or a beat since said so)."""
        signed = self._signed_content
        heard = self._beat_load if self._beat_load is not None else signed.load if signed else None
        if self._beat_load is not None or signed is None or load != signed.load:
            self._beat_load = load
        if off_period or heard is None or load_level(heard) != load_level(load):
            self._load_sent_at = now
        return encode_beat(self._identity, self._mesh_key, self._seq, self._next_issued_at(), self._beat_load)

    def publish_once(self, periodic: bool = True) -> bool:
        """One period (periodic) or one wake: a new full advert if it changed (gossipsub too), the same
        one every FULL_REPUBLISH_S (re-signed), otherwise on a period a heartbeat, off the period a beat
        for a moved load level (bounded, see publish_kind); directly to libp2p peers and by multicast.
        Returns whether a full advert went out."""
        now, content = self._clock(), self._content()
        kind = publish_kind(
            None if self._signed is None else self._signed_content,
            content,
            last_load=self._beat_load,
            forced=self._force_full,
            periodic=periodic,
            now=now,
            full_sent_at=self._full_sent_at,
            load_sent_at=self._load_sent_at,
            introduce=self._introduce,
        )
        self._force_full = self._introduce = False
        if kind == "defer":
            self._load_due_at = self._load_sent_at + MIN_LOAD_ADVERT_S
            return False
        self._load_due_at = None
        if kind == "none":
            return False
        full = kind in ("change", "full")
        if full:
            self.sign_current(content)
            self._full_sent_at = now
            data = self._signed
        else:
            data = self._beat(content.load, now, kind == "load")
        assert data is not None
        if self.libp2p is not None:
            if self.records and (kind == "change" or now - self._records_put_at >= RECORD_REPUT_S):
                assert self._signed is not None and self._signed_content is not None
                keys = model_keys(self._signed_content.models)
                if keys:  # a node holding nothing is found by no one: it puts nothing (and dials no replicas)
                    self.libp2p.put_records(self._signed, keys)
                self._records_put_at = now
            elif kind == "change" and not self.records:
                self.libp2p.publish(data)  # relayed to peers we have no connection to
            self.libp2p.send_direct(data, full, skip=frozenset() if full else self._lan_peer_ids())
        if self.multicast is not None:
            self.multicast.send(data)
        return full
