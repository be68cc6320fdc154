"""The mesh simulation: boot, advert gossip into real PeerTables, requests, crashes, replans.

Membership and placement decisions are the production functions, called here exactly as a node
calls them: `PeerTable.apply/expire/snapshot`, `choose_holder`, `cluster_from_adverts`,
`plan_split`, `replan`. The simulation only supplies time, links and failures.

Gossip is modelled, not packet-simulated: an advert reaches a same-site peer after one LAN hop (mDNS)
and a far peer after `log_D(n)` gossipsub hops; every node forwards each new advert to D mesh peers,
which is what the traffic figure counts. At 1000 nodes only `observers` nodes keep a table (all of
them below that), which bounds the run to O(adverts x observers) events.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

from discovery.advert import ModelAdvert
from discovery.envelope import mesh_key_from_secret
from discovery.peer_table import PeerTable
from placement import choose_holder as holder_mod
from placement import from_adverts, plan, replan
from placement import route_pipeline as pipeline_mod
from placement.choose_holder import FailureRecord
from placement.cluster import Cluster, Link, Links, PlacementError, Plan
from simulations.catalog import DEVICES, MODELS
from simulations.events import EventQueue
from simulations.serving import Request, Server
from simulations.sim_node import SPEED_REFERENCE_BYTES, SimNode, make_identity

MDNS_POINTER_BYTES = 3 * 220  # TXT pointer, sent 3 times per announcement (DESIGN.md)
TIMEOUT_S = 1.0
MAX_ATTEMPTS = 4
LAN = Link(0.2, 1.25e9)
BACKBONE = Link(2.0, 1.25e8)


@dataclass(frozen=True, slots=True)
class ScenarioConfig:
    name: str
    n_nodes: int
    devices: tuple[str, ...]
    n_sites: int = 1
    duration_s: float = 120.0
    advert_interval_s: float = 5.0
    ttl_s: float = 15.0
    boot_window_s: float = 5.0
    gossip_degree: int = 6
    observers: int = 0  # 0: every node keeps a table
    whole_model: str = "llama3-8b-q4"
    pipeline_model: str = "llama3-70b-q4"
    request_rate_per_s: float = 1.0
    out_tokens: int = 128
    crashes: int = 1

    def __post_init__(self) -> None:
        if self.n_nodes < 2 or self.n_sites < 1 or self.duration_s <= 0 or self.ttl_s <= self.advert_interval_s:
            raise ValueError(f"bad scenario config {self.name}")
        if any(d not in DEVICES for d in self.devices) or not self.devices:
            raise ValueError(f"unknown device in {self.devices}")
        if self.whole_model not in MODELS or self.pipeline_model not in MODELS:
            raise ValueError("unknown model")


def _digest(name: str) -> str:
    return (name.encode().hex() * 64)[:64]


class MeshSim:
    def __init__(self, cfg: ScenarioConfig, seed: int) -> None:
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.events = EventQueue()
        self.mesh_key = mesh_key_from_secret("simulated-mesh")
        rng = self.rng
        n_obs = cfg.observers or cfg.n_nodes
        self.nodes: list[SimNode] = []
        for i in range(cfg.n_nodes):
            ident = make_identity(rng)
            dev = DEVICES[cfg.devices[i % len(cfg.devices)]]
            free = int(dev.memory_bytes * dev.usable_fraction * rng.uniform(0.75, 1.0))
            nid = ident.node_id
            self.nodes.append(SimNode(i, ident, nid, dev, f"site{i % cfg.n_sites}", free,
                                      PeerTable(nid) if i < n_obs else None))
        self.by_id = {n.node_id: n for n in self.nodes}
        self.observers = [n for n in self.nodes if n.table is not None]
        self.servers: dict[str, Server] = {}
        self.whole = MODELS[cfg.whole_model]
        self.pipe_model = MODELS[cfg.pipeline_model]
        self.plan: Plan | None = None
        self.pipeline: Server | None = None
        self.m: dict[str, Any] = {"served": 0, "failed": 0, "retries": 0, "replans": 0, "moved_layers": 0,
                                  "advert_bytes": 0, "latencies": [], "plan_wall_ms": [], "applied": 0}
        self.last_boot = 0.0
        self.converged_at: float | None = None
        self.crash_at: dict[str, float] = {}
        self.detected_s: list[float] = []
        self._load_whole_models()

    # --- setup ------------------------------------------------------------------------------------
    def _whole_bytes(self) -> int:
        w = self.whole
        return w.n_layers * (w.layer_bytes + w.kv_bytes_per_token_per_layer * 4096 * 4) + w.embed_bytes + w.head_bytes

    def _load_whole_models(self) -> None:
        need = self._whole_bytes()
        for n in self.nodes:
            if n.free_memory_bytes >= need and self.rng.random() < 0.5:
                n.models = (ModelAdvert(_digest(self.cfg.whole_model), self.cfg.whole_model,
                                        self.whole.n_layers, 0, self.whole.n_layers, "llama.cpp", 4096),)
                n.free_memory_bytes -= need
                tpt_ms = self.whole.n_layers * n.device.layer_time_ms(self.whole.layer_bytes) + n.device.overhead_ms
                self.servers[n.node_id] = Server(self.events, n.capacity, self.cfg.out_tokens * tpt_ms / 1000,
                                                 self._done, self._retry)

    def links(self) -> Links:
        sites = {(f"site{i}", f"site{i}"): LAN for i in range(self.cfg.n_sites)}
        return Links(default=BACKBONE, sites=sites)

    # --- membership -------------------------------------------------------------------------------
    def boot(self, node: SimNode) -> None:
        node.alive = True
        node.seq = 1
        self.last_boot = max(self.last_boot, self.events.now)
        self.publish(node)

    def publish(self, node: SimNode) -> None:
        """The periodic advert: send it now and schedule the next one."""
        if not node.alive:
            return
        self._send(node)
        self.events.after(self.cfg.advert_interval_s * self.rng.uniform(0.9, 1.1), self.publish, node)

    def _send(self, node: SimNode) -> None:
        """One advert to the mesh (also pushed on change, outside the period)."""
        if not node.alive:
            return
        cfg, now = self.cfg, self.events.now
        load = len(self.servers[node.node_id].running) if node.node_id in self.servers else 0
        if load != node.active:
            node.active, node.seq = load, node.seq + 1
        advert = node.advert(now, cfg.ttl_s)
        size = node.measure_wire_bytes(now, cfg.ttl_s, self.mesh_key)
        # Every live node forwards each new advert to D gossip peers; the sender also multicasts a pointer.
        alive = sum(1 for n in self.nodes if n.alive) if cfg.n_nodes <= 64 else self._alive_estimate()
        self.m["advert_bytes"] += size * min(cfg.gossip_degree, alive - 1) * alive + MDNS_POINTER_BYTES
        hops = max(1, math.ceil(math.log(max(2, cfg.n_nodes), cfg.gossip_degree)))
        for obs in self.observers:
            if obs is node:
                continue
            same = obs.site == node.site
            delay_ms = LAN.latency_ms if same else hops * (BACKBONE.latency_ms + 1.0)
            self.events.after((delay_ms + self.rng.uniform(0, 1.0)) / 1000, self._deliver, obs, advert)

    def _alive_estimate(self) -> int:
        return self.cfg.n_nodes - len(self.crash_at)

    def _deliver(self, obs: SimNode, advert: Any) -> None:
        if not obs.alive or obs.table is None:
            return
        obs.table.apply(advert, self.events.now, "sim")
        self.m["applied"] += 1
        if self.converged_at is None and self.events.now >= self.last_boot and self._all_converged():
            self.converged_at = self.events.now

    def _all_converged(self) -> bool:
        target = self.cfg.n_nodes - 1
        return all(len(o.table) >= target for o in self.observers if o.table is not None)

    def expire_tick(self) -> None:
        now = self.events.now
        for obs in self.observers:
            if obs.alive and obs.table is not None:
                for gone in obs.table.expire(now):
                    self._on_expired(obs, gone, now)
        self.events.after(1.0, self.expire_tick)

    def _on_expired(self, obs: SimNode, gone: str, now: float) -> None:
        if gone in self.crash_at and all(o.table is None or o.table.get(gone) is None or not o.alive
                                         for o in self.observers):
            self.detected_s.append(now - self.crash_at.pop(gone))
        if obs is self.coordinator and self.plan is not None and any(s.node == gone for s in self.plan.stages):
            self._replan()

    def crash(self, node: SimNode) -> None:
        node.alive = False
        self.crash_at[node.node_id] = self.events.now
        if node.node_id in self.servers:
            self.servers[node.node_id].fail_all()
        if self.plan is not None and self.pipeline is not None and any(s.node == node.node_id for s in self.plan.stages):
            self.pipeline.fail_all()

    # --- placement --------------------------------------------------------------------------------
    @property
    def coordinator(self) -> SimNode:
        return self.observers[0]

    def _cluster(self) -> Cluster:
        c = self.coordinator
        now = self.events.now
        adverts = [c.advert(now, self.cfg.ttl_s)] + [p.advert for p in _table(c).snapshot(now)]
        sites = {a.node_id: self.by_id[a.node_id].site for a in adverts}
        return from_adverts.cluster_from_adverts(self.pipe_model, adverts, bytes_per_speed_token=SPEED_REFERENCE_BYTES,
                                                 links=self.links(), sites=sites, concurrency=4)

    def initial_plan(self) -> None:
        t0 = time.perf_counter()
        try:
            self._activate(plan.plan_split(self._cluster()))
        except PlacementError:
            self.plan = None
        self.m["plan_wall_ms"].append((time.perf_counter() - t0) * 1000)

    def _replan(self) -> None:
        if self.plan is None:
            return
        t0 = time.perf_counter()
        try:
            new = replan.replan(self.plan, self._cluster())
        except PlacementError:
            self.plan = self.pipeline = None
            return
        self.m["plan_wall_ms"].append((time.perf_counter() - t0) * 1000)
        self.m["replans"] += 1
        self.m["moved_layers"] += replan.moved_layers(self.plan, new)
        self._activate(new)

    def _activate(self, p: Plan) -> None:
        """Stage nodes load their ranges and advertise them; gateways find the chain by route_pipeline."""
        digest, n_layers = _digest(self.cfg.pipeline_model), self.pipe_model.n_layers
        ranges = {s.node: (s.start, s.end) for s in p.stages}
        for n in self.nodes:
            kept = tuple(m for m in n.models if m.digest != digest)
            if n.node_id in ranges:
                start, end = ranges[n.node_id]
                kept += (ModelAdvert(digest, self.cfg.pipeline_model, n_layers, start, end, "torch", 4096),)
            if kept != n.models:
                n.models = kept
                n.seq += 1
                self._send(n)
        self.plan = p
        self.pipeline = Server(self.events, p.concurrency, self.cfg.out_tokens * p.time_per_token_ms / 1000,
                               self._done, self._retry)

    # --- requests ---------------------------------------------------------------------------------
    def arrival(self, rid: int) -> None:
        kind = "pipeline" if self.rng.random() < 0.3 else "whole"
        self.route(Request(rid, self.events.now, kind))
        self.events.after(self.rng.expovariate(self.cfg.request_rate_per_s), self.arrival, rid + 1)

    def route(self, req: Request) -> None:
        req.attempts += 1
        if req.attempts > MAX_ATTEMPTS:
            self.m["failed"] += 1
            return
        if req.attempts > 1:
            self.m["retries"] += 1
        now = self.events.now
        gateways = [o for o in self.observers if o.alive]
        gw = gateways[self.rng.randrange(len(gateways))]
        peers = [p.advert for p in _table(gw).snapshot(now)]
        if req.kind == "pipeline":
            chain = pipeline_mod.route_pipeline(_digest(self.cfg.pipeline_model), [gw.advert(now, self.cfg.ttl_s), *peers])
            if chain is None or self.pipeline is None or not all(self.by_id[s.node].alive for s in chain.stages):
                self.events.after(TIMEOUT_S * 2, self.route, req)  # no chain seen yet, or a dead stage: time out
            else:
                self.pipeline.submit(req)
            return
        holder = holder_mod.choose_holder(_digest(self.cfg.whole_model), peers, gw.advert(now, self.cfg.ttl_s),
                                          now, gw.failures, inflight=gw.inflight)
        if holder is None:
            self.events.after(TIMEOUT_S, self.route, req)
            return
        target = self.by_id[holder]
        if not target.alive:  # the table still lists a crashed node: pay a timeout, back it off
            old = gw.failures.get(holder)
            gw.failures[holder] = FailureRecord((old.count if old else 0) + 1, now)
            self.events.after(TIMEOUT_S, self.route, req)
            return
        self.servers[holder].submit(req)

    def _done(self, req: Request) -> None:
        req.done = True
        self.m["served"] += 1
        self.m["latencies"].append(self.events.now - req.arrived_s)

    def _retry(self, req: Request) -> None:
        self.events.after(TIMEOUT_S, self.route, req)

    # --- the run ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, ev, rng = self.cfg, self.events, self.rng
        for n in self.nodes:
            ev.at(rng.uniform(0, cfg.boot_window_s), self.boot, n)
        ev.at(1.0, self.expire_tick)
        settle = cfg.boot_window_s + 2 * cfg.advert_interval_s
        ev.at(settle, self.initial_plan)
        ev.at(settle + 0.5, self.arrival, 0)
        ev.at(settle + 1.0, self._schedule_crashes)
        ev.run_until(cfg.duration_s)
        return self.report()

    def _schedule_crashes(self) -> None:
        cfg = self.cfg
        spare = [n for n in self.nodes if n is not self.coordinator]
        stage_nodes = [self.by_id[s.node] for s in self.plan.stages] if self.plan else []
        picks = [n for n in stage_nodes if n is not self.coordinator][:1]
        rest = [n for n in spare if n not in picks]
        picks += self.rng.sample(rest, max(0, min(len(rest), cfg.crashes - len(picks))))
        lo = max(self.events.now + 1.0, cfg.duration_s * 0.35)
        hi = max(lo + 1.0, cfg.duration_s * 0.5)
        for n in picks[: cfg.crashes]:
            self.events.at(self.rng.uniform(lo, hi), self.crash, n)

    def report(self) -> dict[str, Any]:
        cfg, m = self.cfg, self.m
        lat = sorted(m["latencies"])
        p = self.plan
        return {
            "scenario": cfg.name, "nodes": cfg.n_nodes, "sites": cfg.n_sites,
            "observers": len(self.observers), "duration_s": cfg.duration_s,
            "advert_bytes_per_s_per_node": round(m["advert_bytes"] / cfg.n_nodes / cfg.duration_s, 1),
            "table_convergence_s": None if self.converged_at is None else round(self.converged_at - self.last_boot, 3),
            "crash_detection_s": round(statistics.mean(self.detected_s), 3) if self.detected_s else None,
            "adverts_applied": m["applied"], "events": self.events.ran,
            "requests_served": m["served"], "requests_failed": m["failed"], "retries": m["retries"],
            "latency_p50_s": round(lat[len(lat) // 2], 3) if lat else None,
            "latency_p95_s": round(lat[int(len(lat) * 0.95)], 3) if lat else None,
            "pipeline_stages": len(p.stages) if p else 0,
            "pipeline_tokens_per_s": round(p.tokens_per_s, 2) if p else None,
            "replans": m["replans"], "moved_layers": m["moved_layers"],
            "plan_wall_ms": round(max(m["plan_wall_ms"]), 2) if m["plan_wall_ms"] else None,
        }


def _table(observer: SimNode) -> PeerTable:
    """The table of an observer (coordinators and gateways are picked among observers)."""
    if observer.table is None:
        raise ValueError("only observers keep a peer table")
    return observer.table
