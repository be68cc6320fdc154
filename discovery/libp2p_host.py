"""A py-libp2p host (TCP + Noise + yamux, Kademlia DHT, gossipsub) in its own trio thread.

py-libp2p is trio-only and the node runs asyncio, so the host lives in a dedicated thread under
`trio.run`. Crossing the boundary is explicit and one-way each time: asyncio -> trio through
`TrioToken.run_sync_soon` (publish, connect, stop), trio -> asyncio through `loop.call_soon_threadsafe`
(received messages, start-up). Shared otherwise: only `connected_peers`, a frozenset swapped whole.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import cast

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from discovery.envelope import derive_subkey
from discovery.identity import Identity
from discovery.libp2p_direct import BEAT_PROTOCOL, Direct, DirectBeats
from discovery.libp2p_keys import libp2p_key_pair, own_addrs, peer_id_of
from discovery.libp2p_records import NAMESPACE, AdvertRecordValidator, advert_record_key
from discovery.model_records import MAX_RESULTS, sample_peers
from discovery.netaddr import announce_ips

log = logging.getLogger(__name__)

ADVERT_TOPIC = "/meshllm/adverts/1"
DHT_PROTOCOL_PREFIX = TProtocol("/meshllm")  # not /ipfs: our DHT never mixes with the public one
MAX_CONNECTIONS = 64  # dial at most this many peers we learn about; gossipsub relays the rest
CONNECT_TIMEOUT_S = 5.0
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
MAINTAIN_INTERVAL_S = 2.0
BOOTSTRAP_REDIAL_S = 30.0
GOSSIP_DEGREE = 3  # gossipsub D (default 6): measured 27 KB/s per node at rest with 8 nodes at D=6
GOSSIP_HEARTBEAT_S = 1  # mesh upkeep only: with gossip_window=0 a heartbeat sends nothing at rest
MAX_BEAT_STREAMS = 2 * MAX_CONNECTIONS  # inbound direct streams served at once; more are reset
OUTBOX_SIZE = 64  # publishes queued toward the trio thread; a full outbox drops the newest
RECORD_OP_TIMEOUT_S = 10.0  # one record put or lookup (Kademlia walks included)
MAX_RECORD_KEYS = 16  # model keys one put provides (a node advertising more provides the first ones)


class Libp2pError(Exception):
    """The host did not start (START_TIMEOUT_S) or its thread died."""


async def start_host(identity: Identity, mesh_key: bytes, on_message: Callable[[bytes], object], host_ip: str,
                     port: int, bootstrap: Sequence[str], *, records: bool,
                     on_record: Callable[[bytes], object] | None = None,
                     on_exchange: Callable[[bytes, str], object] | None = None) -> Libp2pHost:
    """The node's host, started: its pnet PSK derived from the mesh key (another mesh cannot even finish
    a handshake), in records mode with the DHT's advert record validator."""
    host = Libp2pHost(
        identity,
        on_message,
        listen_ip=host_ip,
        announce_ips=announce_ips(host_ip),
        port=port,
        bootstrap=bootstrap,
        psk_hex=derive_subkey(mesh_key, "libp2p-pnet").hex(),
        mesh_key=mesh_key if records else None,
        on_record=on_record,
        on_exchange=on_exchange,
    )
    await host.start()
    return host


class Libp2pHost:
    """Owns the trio thread. Public methods are called from the asyncio loop that called start()."""

    def __init__(
        self,
        identity: Identity,
        on_message: Callable[[bytes], object],
        *,
        listen_ip: str = "127.0.0.1",
        announce_ips: Sequence[str] = (),
        port: int = 0,
        bootstrap: Sequence[str] = (),
        psk_hex: str | None = None,
        mesh_key: bytes | None = None,
        on_record: Callable[[bytes], object] | None = None,
        on_exchange: Callable[[bytes, str], object] | None = None,
    ) -> None:
        """`mesh_key`: given, records mode: the DHT takes advert records (libp2p_records.py), and the
        host dials its bootstrap peers, a sample (model_records.sample_peers) of the DHT's peers and the
        holders its lookups find, not every DHT peer."""
        self._identity = identity
        self._on_message = on_message  # runs on the asyncio loop
        self._on_record = on_record or on_message  # an advert a lookup got from the DHT (asyncio loop)
        self._on_exchange = on_exchange or (lambda _d, _p: None)  # an anti-entropy frame and its sender's peer id (asyncio loop)
        self._listen_ip = listen_ip
        self._announce_ips = list(announce_ips) or [listen_ip]
        self._port = port
        self._bootstrap = [multiaddr.Multiaddr(a) for a in bootstrap]  # bad addresses fail here, early
        self._psk_hex = psk_hex
        self.peer_id = peer_id_of(identity)
        self._addrs: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._outbox: trio.MemorySendChannel[bytes] | None = None
        self._dial: trio.MemorySendChannel[str] | None = None
        self._direct: trio.MemorySendChannel[Direct] | None = None
        self._mesh_key = mesh_key
        self._records: trio.MemorySendChannel[tuple[str, object]] | None = None
        self._beats = DirectBeats(  # trio thread only
            self._deliver,
            lambda data, peer: self._call_loop(functools.partial(self._on_exchange, data, peer)),
            max_peers=MAX_CONNECTIONS,
            max_inbound=MAX_BEAT_STREAMS,
            open_timeout_s=CONNECT_TIMEOUT_S,
        )
        self._cancel: trio.CancelScope | None = None
        self._error: BaseException | None = None

    @property
    def addrs(self) -> list[str]:
        """Full multiaddrs (ending in /p2p/<peer id>) that others can bootstrap from."""
        return list(self._addrs)

    async def start(self) -> None:
        # py-libp2p logs every failed dial at ERROR through Python's last-resort stderr handler (its
        # import leaves "libp2p" handler-less, not propagating); unreachable peers are routine here.
        # Quiet it unless LIBP2P_DEBUG configured handlers.
        lib_log = logging.getLogger("libp2p")
        if not lib_log.handlers and not lib_log.propagate:
            lib_log.setLevel(logging.CRITICAL)
        self._loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._thread_main, args=(started,), name=f"libp2p-{self.peer_id[-6:]}", daemon=True
        )
        self._thread.start()
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                await started
        except TimeoutError:
            await self.stop()
            raise Libp2pError(f"libp2p host did not start within {START_TIMEOUT_S} s") from None

    async def stop(self) -> None:
        if self._token is not None and self._cancel is not None:
            try:
                self._token.run_sync_soon(self._cancel.cancel)
            except trio.RunFinishedError:
                pass
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, STOP_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("libp2p thread did not stop within %.0f s", STOP_TIMEOUT_S)
            self._thread = None
        self._token = None

    def publish(self, data: bytes) -> None:
        """Queues data for the advert topic; never blocks the asyncio loop."""
        self._send_to_trio(self._outbox, data)

    def send_direct(self, data: bytes, full: bool, skip: frozenset[str] = frozenset()) -> None:
        """Sends an envelope to every directly connected peer over its beat stream (no relaying).

        `full`: data is our signed advert; it is also the first frame on every new stream, so a peer
        that connects learns who we are before our heartbeats (which it can only check against it).
        `skip`: peer ids (base58) not to send this one to (they hear our LAN multicast).
        """
        self._send_to_trio(self._direct, (data, full, skip, ""))

    def send_to(self, peer_id: str, data: bytes) -> None:
        """One frame (an anti-entropy digest or answer) to one connected peer's direct stream."""
        self._send_to_trio(self._direct, (data, False, frozenset(), peer_id))

    @property
    def connected_peers(self) -> frozenset[str]:
        """Peer ids (base58) we have a direct stream to, as of the last send round (0.5 s at most)."""
        return self._beats.streams_to

    def put_records(self, advert: bytes, keys: Sequence[str]) -> None:
        """Puts our signed advert under our advert record key and provides each model key (at most
        MAX_RECORD_KEYS): readers looking a model up find us. Needs mesh_key."""
        self._send_to_trio(self._records, ("put", (advert, tuple(keys[:MAX_RECORD_KEYS]))))

    def lookup(self, key: str) -> None:
        """Finds at most MAX_RESULTS providers of a model key, hands each one's advert record to
        on_message and dials it (its beats follow). Needs mesh_key."""
        self._send_to_trio(self._records, ("lookup", key))

    def connect(self, addr: str) -> None:
        """Asks the host to dial a peer's multiaddr (learned from an advert) if not connected."""
        self._send_to_trio(self._dial, addr)

    def _send_to_trio(self, channel: trio.MemorySendChannel | None, item: object) -> None:
        if self._token is None or channel is None:
            return

        def put() -> None:
            try:
                channel.send_nowait(item)
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # the periodic re-publish covers a dropped one

        try:
            self._token.run_sync_soon(put)
        except trio.RunFinishedError:
            pass

    # --- everything below runs in the trio thread ----------------------------------------------------

    def _thread_main(self, started: asyncio.Future[None]) -> None:
        try:
            trio.run(self._trio_main, started)
        except BaseException as e:  # surfaced to start() or logged; the thread must not die silently
            self._error = e
            log.exception("libp2p host stopped with an error")
            err = Libp2pError(repr(e))
            self._call_loop(lambda: None if started.done() else started.set_exception(err))

    def _call_loop(self, fn: Callable[[], object]) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn)
        except RuntimeError:
            pass  # the asyncio loop is closed: the node is going away

    def _deliver(self, data: bytes) -> None:
        """A received envelope (gossipsub or direct), handed to on_message on the asyncio loop."""
        self._call_loop(lambda: self._on_message(data))

    async def _trio_main(self, started: asyncio.Future[None]) -> None:
        key_pair = libp2p_key_pair(self._identity)
        listen_ip = self._listen_ip or "0.0.0.0"
        listen = multiaddr.Multiaddr(f"/ip4/{listen_ip}/tcp/{self._port}")
        noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
        host = new_host(
            key_pair=key_pair,
            sec_opt={NOISE_PROTOCOL_ID: noise},  # Noise only: the default list also accepts plaintext
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
            listen_addrs=[listen],
            psk=self._psk_hex,
            # records mode: py-libp2p's AutoConnector would dial every peer in the peerstore up to its
            # watermarks (200 by default); off, the host dials only what _maintain_loop and lookups pick
            connection_config=None if self._mesh_key is None else ConnectionConfig(
                min_connections=0, low_watermark=0, high_watermark=2 * MAX_CONNECTIONS
            ),
        )
        dht = KadDHT(host, DHTMode.SERVER, protocol_prefix=DHT_PROTOCOL_PREFIX, enable_random_walk=False)
        if self._mesh_key is not None:
            dht.register_validator(NAMESPACE, AdvertRecordValidator(self._mesh_key))
        router = GossipSub(
            protocols=[PROTOCOL_ID_V11],
            # every node re-publishes its whole advert each refresh and each mesh peer relays it:
            # per-node traffic ~ nodes x degree x advert size per period, so keep the mesh thin
            degree=GOSSIP_DEGREE,
            degree_low=GOSSIP_DEGREE - 1,
            degree_high=GOSSIP_DEGREE + 2,
            heartbeat_interval=GOSSIP_HEARTBEAT_S,
            # no IHAVE gossip to non-mesh peers: it cost ~400 B per peer per heartbeat (each RPC carries
            # a signed peer record) and every advert is also sent directly; the mesh still relays
            gossip_window=0,
        )
        pubsub = Pubsub(host, router)
        outbox_send, outbox_recv = trio.open_memory_channel[bytes](OUTBOX_SIZE)
        dial_send, dial_recv = trio.open_memory_channel[str](OUTBOX_SIZE)
        direct_send, direct_recv = trio.open_memory_channel[Direct](OUTBOX_SIZE)
        records_send, records_recv = trio.open_memory_channel[tuple[str, object]](OUTBOX_SIZE)
        host.set_stream_handler(BEAT_PROTOCOL, self._beats.serve)
        async with host.run(listen_addrs=[listen]), background_trio_service(dht):
            # Pubsub must run before any peer connects, or the first messages are lost
            async with background_trio_service(pubsub), background_trio_service(router):
                await pubsub.wait_until_ready()
                subscription = await pubsub.subscribe(ADVERT_TOPIC)
                self._addrs = own_addrs(host, self._port, self._announce_ips, self.peer_id)
                with trio.CancelScope() as cancel:
                    self._cancel = cancel
                    self._token = trio.lowlevel.current_trio_token()
                    self._outbox, self._dial, self._direct = outbox_send, dial_send, direct_send
                    if self._mesh_key is not None:
                        self._records = records_send
                    self._call_loop(lambda: None if started.done() else started.set_result(None))
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._read_loop, subscription)
                        nursery.start_soon(self._publish_loop, pubsub, outbox_recv)
                        nursery.start_soon(self._dial_loop, host, dht, dial_recv)
                        nursery.start_soon(self._maintain_loop, host, dht)
                        nursery.start_soon(self._beats.send_loop, host, direct_recv)
                        nursery.start_soon(self._records_loop, host, dht, records_recv)
                self._outbox = self._dial = self._direct = self._records = None

    async def _read_loop(self, subscription: object) -> None:
        while True:
            msg = await subscription.get()  # type: ignore[attr-defined]
            self._deliver(bytes(msg.data))

    async def _publish_loop(self, pubsub: Pubsub, outbox: trio.MemoryReceiveChannel[bytes]) -> None:
        async for data in outbox:
            try:
                await pubsub.publish(ADVERT_TOPIC, data)
            except Exception as e:  # a publish failure must not end the host; the next one retries
                log.debug("gossipsub publish failed: %r", e)

    async def _dial_loop(self, host: object, dht: KadDHT, dial: trio.MemoryReceiveChannel[str]) -> None:
        async for addr in dial:
            await self._connect(host, dht, addr)

    async def _records_loop(self, host: object, dht: KadDHT, ops: trio.MemoryReceiveChannel[tuple[str, object]]) -> None:
        async for op, arg in ops:
            with trio.move_on_after(RECORD_OP_TIMEOUT_S):
                try:
                    if op == "put":
                        advert, keys = cast(tuple[bytes, tuple[str, ...]], arg)
                        await dht.put_value(advert_record_key(self.peer_id), advert)
                        for key in keys:
                            await dht.provide(key)
                    else:
                        await self._lookup(host, dht, str(arg))
                except Exception as e:  # a failed put or lookup must not end the host; the next retries
                    log.debug("record %s failed: %r", op, e)

    async def _lookup(self, host: object, dht: KadDHT, key: str) -> None:
        providers = await dht.find_providers(key, count=MAX_RESULTS)
        for info in providers[:MAX_RESULTS]:
            pid = info.peer_id.to_base58()
            if pid == self.peer_id:
                continue
            value = await dht.get_value(advert_record_key(pid))  # validated by AdvertRecordValidator
            if value is None:
                continue
            # dial first: by the time a router sees the holder in its table, our beat stream (whose
            # first frame introduces us, so the holder accepts our TLS certificate) is being opened
            if info.addrs:
                await self._connect_info(host, dht, info)
            self._call_loop(functools.partial(self._on_record, bytes(value)))

    async def _maintain_loop(self, host: object, dht: KadDHT) -> None:
        """Keeps bootstrap peers and DHT-known peers connected, so gossip has a path everywhere."""
        last_bootstrap = float("-inf")
        network = host.get_network()  # type: ignore[attr-defined]
        while True:
            # redial bootstrap peers at once when alone, else rarely: a dead one must not spam dials
            if not network.connections or trio.current_time() - last_bootstrap >= BOOTSTRAP_REDIAL_S:
                last_bootstrap = trio.current_time()
                for addr in self._bootstrap:
                    await self._connect(host, dht, str(addr))
            pids = dht.routing_table.get_peer_ids()
            if self._mesh_key is not None:  # records mode: a bounded sample; lookups dial the rest
                by_b58 = {p.to_base58(): p for p in pids}
                pids = [by_b58[b] for b in sample_peers(list(by_b58), self.peer_id)]
            for pid in pids:
                if len(network.connections) >= MAX_CONNECTIONS:
                    break
                if pid not in network.connections:
                    info = dht.routing_table.get_peer_info(pid)
                    if info is not None and info.addrs:
                        await self._connect_info(host, dht, info)
            await trio.sleep(MAINTAIN_INTERVAL_S)

    async def _connect(self, host: object, dht: KadDHT, addr: str) -> None:
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as e:  # a peer-supplied address: malformed ones are dropped, not raised
            log.debug("bad libp2p address %r: %r", addr, e)
            return
        if info.peer_id.to_base58() == self.peer_id:
            return
        await self._connect_info(host, dht, info)

    async def _connect_info(self, host: object, dht: KadDHT, info: PeerInfo) -> None:
        network = host.get_network()  # type: ignore[attr-defined]
        if info.peer_id in network.connections or len(network.connections) >= MAX_CONNECTIONS:
            return
        with trio.move_on_after(CONNECT_TIMEOUT_S):
            try:
                await host.connect(info)  # type: ignore[attr-defined]
                await dht.add_peer(info.peer_id)
            except Exception as e:  # unreachable peers are normal; the next round retries
                log.debug("libp2p connect to %s failed: %r", info.peer_id, e)
