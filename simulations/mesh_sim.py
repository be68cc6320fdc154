"""The mesh simulation: every node runs the production discovery code on a simulated clock and links.

Each node is a real `Discovery` (discovery/service.py): its Publisher signs our advert and decides,
each period, between a full advert and a heartbeat (`Publisher.publish_once`, as the node's run loop
calls it); what it sends crosses `simulations/sim_transport.py` into the receivers' `Discovery.receive`
(validation, signatures, seq and replay rules, the PeerTable); `expire_now()` runs every 0.5 s as the
node's expire loop does. Requests are routed by the production pure functions (`rank_holders`, the
retry policy of dataplane/routing/retry.py, `route_pipeline`, failover's `replacement_route`,
`plan_split`/`replan`): simulations/gateway.py. The simulator supplies time, links, load and failures.

Membership modes: `lan` (one multicast socket per site, libp2p beyond it, gossip of changed adverts:
what nodes run today), `libp2p` (libp2p only, every node meets every other), and `records` (past one
LAN: a bounded sample of peers plus model-keyed records, discovery/model_records.py).
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

from discovery import model_records as mr
from discovery.advert import ModelAdvert
from discovery.anti_entropy import EXCHANGE_EVERY_S
from discovery.envelope import mesh_key_from_secret
from discovery.peer_table import Peer
from discovery.publisher import PUBLISH_DEBOUNCE_S
from discovery.service import DEFAULT_REFRESH_S, DEFAULT_TTL_S, EXPIRE_INTERVAL_S
from placement.cluster import Link, Links
from simulations import traffic_model as tm
from simulations.catalog import DEVICES, MODELS
from simulations.events import EventQueue
from simulations.gateway import Gateways
from simulations.serving import Server
from simulations.sim_node import SimNode, attach_discovery, make_cert, make_identity
from simulations.sim_transport import SimHost, SimMulticast, SimNet

LAN = Link(0.2, 1.25e9)
BACKBONE = Link(2.0, 1.25e8)
MODES = ("lan", "libp2p", "records")


@dataclass(frozen=True, slots=True)
class ScenarioConfig:
    name: str
    n_nodes: int
    devices: tuple[str, ...]
    n_sites: int = 1
    duration_s: float = 120.0
    mode: str = "lan"
    ttl_s: float = DEFAULT_TTL_S  # the node's defaults: the protocol the nodes run
    refresh_s: float = DEFAULT_REFRESH_S
    boot_window_s: float = 5.0
    rest_s: float = 60.0  # after boot, a quiet window: traffic at rest is measured here
    observers: int = 0  # 0: every node runs the receive path; else only the first `observers` do
    whole_model: str = "llama3-8b-q4"
    pipeline_model: str = "llama3-70b-q4"
    request_rate_per_s: float = 1.0
    out_tokens: int = 128
    crash_per_min: float = 0.05  # share of the nodes crashing per minute once requests flow
    crashes: int = -1  # >= 0: exactly this many crashes instead of crash_per_min
    anti_entropy: bool = True  # a digest to one connected peer per EXCHANGE_EVERY_S (discovery/exchange.py)
    lost_announce: int = 0  # the last nodes to boot whose gossiped announcements never get out

    def __post_init__(self) -> None:
        if self.n_nodes < 2 or self.n_sites < 1 or self.duration_s <= 0 or self.ttl_s <= self.refresh_s:
            raise ValueError(f"bad scenario config {self.name}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if any(d not in DEVICES for d in self.devices) or not self.devices:
            raise ValueError(f"unknown device in {self.devices}")
        if self.whole_model not in MODELS or self.pipeline_model not in MODELS:
            raise ValueError("unknown model")


def digest_of(name: str) -> str:
    return (name.encode().hex() * 64)[:64]


class MeshSim:
    def __init__(self, cfg: ScenarioConfig, seed: int) -> None:
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.events = EventQueue()
        self.mesh_key = mesh_key_from_secret("simulated-mesh")
        self.net = SimNet(self.events, self._latency_s, "records" if cfg.mode == "records" else "gossip")
        self.net.on_record_put = self._put_records
        self.records = mr.RecordStore()
        self.put_keys: dict[str, set[str]] = {}  # node id -> the record keys it last put
        n_obs = cfg.observers or cfg.n_nodes
        self.nodes: list[SimNode] = []
        for i in range(cfg.n_nodes):
            ident = make_identity(self.rng)
            dev = DEVICES[cfg.devices[i % len(cfg.devices)]]
            free = int(dev.memory_bytes * dev.usable_fraction * self.rng.uniform(0.75, 1.0))
            node = SimNode(i, ident, ident.node_id, dev, f"site{i % cfg.n_sites}", free, i < n_obs)
            node.tls_cert = make_cert(node.node_id)
            attach_discovery(node, self.mesh_key, self._clock, cfg.ttl_s, cfg.refresh_s)
            node.host = SimHost(self.net, node)
            self.net.add(node)
            self.nodes.append(node)
        sites: dict[str, list[SimNode]] = {}
        for n in self.nodes:
            sites.setdefault(n.site, []).append(n)
        for n in self.nodes:
            multicast = SimMulticast(self.net, n, sites[n.site]) if cfg.mode == "lan" else None
            # the simulated transports stand in for Libp2pHost / AdvertMulticast (same calls, duck-typed)
            n.discovery.use_transports(cast(Any, n.host), cast(Any, multicast), partial(self._fetch_missed, n))
            n.discovery.publisher.on_wake = lambda n=n: self._wake(n)
        self.by_id = {n.node_id: n for n in self.nodes}
        self.whole_digest, self.pipe_digest = digest_of(cfg.whole_model), digest_of(cfg.pipeline_model)
        self.last_boot = 0.0
        self.converged_at: float | None = None
        self.crash_at: dict[str, float] = {}
        self.rest_window: tuple[float, float] = (0.0, 0.0)
        self.rest_traffic: tuple[dict[int, int], dict[int, int]] = ({}, {})
        self.rest_messages = 0
        self.gateways = Gateways(self)
        self.lost_met: dict[str, set[str]] = {}  # lost node id -> the (node, peer) pairs met, as "a>b"
        self.lost_met_at: float | None = None
        self._load_whole_models()

    # --- the world --------------------------------------------------------------------------------
    def _clock(self) -> float:
        return self.events.now

    def _latency_s(self, a: SimNode, b: SimNode) -> float:
        return (LAN.latency_ms if a.site == b.site else BACKBONE.latency_ms) / 1000

    def links(self) -> Links:
        return Links(default=BACKBONE, sites={(f"site{i}", f"site{i}"): LAN for i in range(self.cfg.n_sites)})

    def _load_whole_models(self) -> None:
        w = MODELS[self.cfg.whole_model]
        need = w.n_layers * (w.layer_bytes + w.kv_bytes_per_token_per_layer * 4096 * 4) + w.embed_bytes + w.head_bytes
        for n in self.nodes:
            if n.free_memory_bytes >= need and self.rng.random() < 0.5:
                n.models = (ModelAdvert(self.whole_digest, self.cfg.whole_model, w.n_layers, 0, w.n_layers,
                                        "llama.cpp", 4096),)
                n.free_memory_bytes -= need
                tpt_ms = w.n_layers * n.device.layer_time_ms(w.layer_bytes) + n.device.overhead_ms
                n.server = Server(self.events, n.capacity, self.cfg.out_tokens * tpt_ms / 1000,
                                  self.gateways.done, self.gateways.failed_on)
                n.server.on_change = n.discovery.load_changed  # as the daemon does on a load change

    # --- membership: the node's own loops, on the simulated clock ---------------------------------
    def boot(self, node: SimNode) -> None:
        node.alive = True
        self.last_boot = max(self.last_boot, self.events.now)
        node.discovery.publisher.sign_current()
        live = [n for n in self.nodes if n.alive and n is not node]
        if self.cfg.mode == "records":
            self._put_records(node, node.discovery.signed_advert())
            open_ = [n.node_id for n in live if len(n.host.connections) < mr.MAX_SAMPLE_CONNECTIONS]
            ids = mr.sample_peers(open_, node.node_id)
            for nid in ids:
                node.host.connect(self.by_id[nid].host.addrs[0])
        elif self.cfg.mode == "libp2p" and live:
            # node 0 is the bootstrap; booting after others, node 0 itself dials the first live node
            boot = self.nodes[0] if self.nodes[0].alive and self.nodes[0] is not node else live[0]
            node.host.connect(boot.host.addrs[0])
        node.discovery.publish_soon()
        self.events.after(self.rng.uniform(0, self.cfg.refresh_s), self._period, node)
        self.events.after(self.rng.uniform(0, EXPIRE_INTERVAL_S), self._expire, node)
        if self.cfg.anti_entropy and self.cfg.mode != "records":
            self.events.after(self.rng.uniform(0, EXCHANGE_EVERY_S), self._exchange, node)

    def _exchange(self, node: SimNode) -> None:
        """The node's exchange loop (AntiEntropy.run): one digest to one connected peer per period."""
        if node.alive:
            node.discovery.exchange.ask()
            self.events.after(EXCHANGE_EVERY_S, self._exchange, node)

    def _period(self, node: SimNode) -> None:
        if not node.alive:
            return
        node.discovery.publisher.publish_once()
        if self.cfg.mode == "lan" and self.cfg.n_sites > 1:
            self._meet_far(node)
        self.events.after(self.cfg.refresh_s, self._period, node)

    def _meet_far(self, node: SimNode) -> None:
        """libp2p beyond the site: nodes dial the far peers they learn of (Discovery.receive does it on
        NEW adverts; the first far peer comes from the bootstrap list)."""
        if not node.host.connections:
            far = [n for n in self.nodes if n.alive and n.site != node.site]
            if far:
                node.host.connect(far[0].host.addrs[0])

    def _wake(self, node: SimNode) -> None:
        """publish_soon(): the run loop publishes PUBLISH_DEBOUNCE_S later (once per burst)."""
        if node.publish_pending or not node.alive:
            return
        node.publish_pending = True
        self.events.after(PUBLISH_DEBOUNCE_S, self._publish_soon, node)

    def _publish_soon(self, node: SimNode) -> None:
        node.publish_pending = False
        if node.alive:
            publisher = node.discovery.publisher
            publisher.publish_once(periodic=False)
            due = publisher.load_due_at()
            if due is not None:  # a load beat deferred (MIN_LOAD_ADVERT_S): the run loop wakes then
                node.publish_pending = True
                self.events.after(max(1e-3, due - self.events.now), self._publish_soon, node)

    def _expire(self, node: SimNode) -> None:
        if not node.alive:
            return
        if node.receives:
            for gone in node.discovery.expire_now():
                self.gateways.on_left(node, gone)
            self._check_converged()
            self._check_lost(node)
        self.events.after(EXPIRE_INTERVAL_S, self._expire, node)

    def _fetch_missed(self, node: SimNode, peer: Peer) -> None:
        """A beat named a newer seq: fetch that node's advert (HTTP in the node; one round trip here)."""
        src = self.by_id.get(peer.advert.node_id)
        if src is None or not src.alive:
            return
        data = src.discovery.signed_advert()
        self.net.deliver(src, node, data, "libp2p", tm.libp2p_bytes(len(data)) + 300)

    # --- records mode: the DHT ----------------------------------------------------------------------
    def _put_records(self, node: SimNode, advert_bytes: bytes) -> None:
        if not node.alive:
            return
        n = self.cfg.n_nodes
        keys = {mr.record_key(m.digest) for m in node.models}
        if node.free_memory_bytes > 8 * 2**30:
            keys.add(mr.record_key(self.pipe_digest + "/offer"))
        for gone in self.put_keys.get(node.node_id, set()) - keys:
            # it no longer holds that model (a replan moved its range): withdraw the entry, or readers
            # keep getting its old advert, with the old range, from the record
            self.records.remove(gone, node.node_id)
        self.put_keys[node.node_id] = keys
        for model in node.models:
            cost = tm.dht_hops(n) * tm.DHT_HOP_BYTES + tm.DHT_REPLICAS * tm.libp2p_bytes(len(advert_bytes))
            self._dht_cost(node, cost)
            self.records.put(mr.record_key(model.digest), node.node_id, advert_bytes,
                             ((model.start, model.end),), self.events.now)
        if node.free_memory_bytes > 8 * 2**30:  # it can take layers of the pipeline model: an offer
            self._dht_cost(node, tm.dht_hops(n) * tm.DHT_HOP_BYTES + tm.DHT_REPLICAS * tm.libp2p_bytes(len(advert_bytes)))
            self.records.put(mr.record_key(self.pipe_digest + "/offer"), node.node_id, advert_bytes, (), self.events.now)

    def _reput(self, node: SimNode) -> None:
        if node.alive:
            self._put_records(node, node.discovery.signed_advert())
            self.events.after(mr.RECORD_REPUT_S, self._reput, node)

    def lookup(self, node: SimNode, key: str, limit: int = mr.MAX_RESULTS) -> None:
        """A gateway looks a model key up: each entry goes through Discovery.receive (the trust rules of
        adverts), then it connects to the holders it got, which beat to it from then on."""
        now = self.events.now
        node.tracking[key] = now
        entries = self.records.get(key, node.node_id, now, limit=limit)
        self._dht_cost(node, tm.dht_hops(self.cfg.n_nodes) * tm.DHT_HOP_BYTES
                       + sum(tm.libp2p_bytes(len(e.value)) for e in entries))
        delay = tm.dht_hops(self.cfg.n_nodes) * BACKBONE.latency_ms / 1000
        self.events.after(delay, self._looked_up, node, [(e.node_id, e.value) for e in entries])

    def _looked_up(self, node: SimNode, entries: list[tuple[str, bytes]]) -> None:
        if not node.alive:
            return
        for node_id, value in entries:
            if node.discovery.table.get(node_id) is not None:
                continue  # tracked already, by its beats: the stored entry can only be as new or older
            accepted = node.discovery.receive(value, "dht")
            holder = self.by_id.get(node_id)
            if (accepted or node.discovery.table.get(node_id) is not None) and holder is not None:
                node.host.connect(holder.host.addrs[0])

    def _dht_cost(self, node: SimNode, nbytes: float) -> None:
        if self.net.counting:
            self.net.traffic.add_sent(node.index, nbytes / 2)
            self.net.traffic.add_received(node.index, nbytes / 2)

    # --- measures -----------------------------------------------------------------------------------
    def _check_converged(self) -> None:
        if self.converged_at is not None or self.events.now < self.final_boot:
            return
        if all(self.gateways.converged(o) for o in self.nodes if o.receives and o.alive):
            self.converged_at = self.events.now

    def _check_lost(self, node: SimNode) -> None:
        """Lost announcements: when has every node held each lost node, and each lost node every node?"""
        if not self.lost_met or self.lost_met_at is not None:
            return
        table = node.discovery.table
        for lost_id, met in self.lost_met.items():
            if node.node_id != lost_id and table.get(lost_id) is not None:
                met.add(node.node_id + ">")
            if node.node_id == lost_id:
                met.update("<" + p.advert.node_id for p in table.snapshot(self.events.now))
        want = 2 * (sum(1 for n in self.nodes if n.receives) - 1)
        if all(len(met) >= want for met in self.lost_met.values()):
            self.lost_met_at = self.events.now

    def crash(self, node: SimNode) -> None:
        if not node.alive:
            return
        node.alive = False
        self.crash_at[node.node_id] = self.events.now
        self.gateways.on_crash(node)

    def _begin_rest(self) -> None:
        self._rest_from = self.events.now
        self._rest_messages0 = self.net.traffic.messages
        self.net.traffic.sent.clear()
        self.net.traffic.received.clear()

    def _end_rest(self) -> None:
        self.rest_window = (self._rest_from, self.events.now)
        self.rest_traffic = (dict(self.net.traffic.sent), dict(self.net.traffic.received))
        self.rest_messages = self.net.traffic.messages - self._rest_messages0
        self.net.traffic.sent.clear()
        self.net.traffic.received.clear()
        self._load_from = self.events.now

    def run(self) -> dict[str, Any]:
        cfg, ev, rng = self.cfg, self.events, self.rng
        boots = [rng.uniform(0, cfg.boot_window_s) for _ in self.nodes]
        self.final_boot = max(boots)
        last = sorted(range(len(boots)), key=boots.__getitem__)[len(boots) - cfg.lost_announce:]
        self.net.lost_announce = set(last) if cfg.lost_announce else set()
        self.lost_met = {self.nodes[i].node_id: set() for i in self.net.lost_announce}
        for n, at in zip(self.nodes, boots, strict=True):
            ev.at(at, self.boot, n)
            if cfg.mode == "records":
                ev.at(cfg.boot_window_s + rng.uniform(0, mr.RECORD_REPUT_S), self._reput, n)
        settle = cfg.boot_window_s + 2 * cfg.refresh_s
        ev.at(settle, self._begin_rest)
        ev.at(settle + cfg.rest_s, self._end_rest)
        start = settle + cfg.rest_s
        ev.at(start, self.gateways.start, start)
        n_crashes = cfg.crashes if cfg.crashes >= 0 else round(cfg.crash_per_min * cfg.n_nodes * (cfg.duration_s - start - 15) / 60)
        spare = [n for n in self.nodes[1:] if n is not self.gateways.coordinator]
        picks = self.gateways.crash_candidates(spare, n_crashes)
        for n in picks:
            ev.at(rng.uniform(start + 5, max(start + 6, cfg.duration_s - 15)), self.crash, n)
        ev.run_until(cfg.duration_s)
        return self.report()

    def report(self) -> dict[str, Any]:
        cfg = self.cfg
        rest_s = max(1e-9, self.rest_window[1] - self.rest_window[0])
        load_s = max(1e-9, cfg.duration_s - getattr(self, "_load_from", cfg.duration_s))
        sent_rest, recv_rest = self.rest_traffic
        n = cfg.n_nodes
        background = tm.LIBP2P_NODE_BACKGROUND_BYTES_S if cfg.mode != "lan" or cfg.n_sites > 1 else 0.0

        def per_node(d: dict[int, int], secs: float) -> float:
            return round(sum(d.values()) / n / secs + background, 1)

        def worst(d: dict[int, int], secs: float) -> float:
            return round(max(d.values(), default=0) / secs + background, 1)

        g = self.gateways.report()
        return {
            "scenario": cfg.name, "nodes": n, "sites": cfg.n_sites, "mode": cfg.mode,
            "receivers": sum(1 for x in self.nodes if x.receives), "duration_s": cfg.duration_s,
            "rest_sent_bytes_per_s_per_node": per_node(sent_rest, rest_s),
            "rest_received_bytes_per_s_per_node": per_node(recv_rest, rest_s),
            "rest_sent_bytes_per_s_worst_node": worst(sent_rest, rest_s),
            "load_sent_bytes_per_s_per_node": per_node(self.net.traffic.sent, load_s),
            "load_received_bytes_per_s_per_node": per_node(self.net.traffic.received, load_s),
            "table_convergence_s": None if self.converged_at is None else round(self.converged_at - self.last_boot, 3),
            "crashes": len(self.crash_at), "events": self.events.ran,
            "rejects": sum(sum(x.discovery.rejects.values()) for x in self.nodes),
            "rest_messages_per_min_per_node": round(self.rest_messages / n / rest_s * 60, 1),
            "exchange_digests": sum(x.discovery.exchange.digests_sent for x in self.nodes),
            "exchange_relayed_accepted": sum(x.discovery.exchange.relayed for x in self.nodes),
            "lost_announce_met_all_s": None if self.lost_met_at is None
            else round(self.lost_met_at - self.final_boot, 1),
            **g,
        }


def mean_or_none(xs: list[float]) -> float | None:
    return round(statistics.mean(xs), 3) if xs else None
