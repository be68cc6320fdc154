"""Requests through simulated gateways, decided by the node's own pure routing code.

A request enters one gateway (a live node that runs the receive path) and stays with it, as an HTTP
request stays with the node it reached. Whole-model requests: `rank_holders` over the gateway's
PeerTable snapshot, then the retry policy of `dataplane/routing/retry.py` (`next_try`, `after_error`,
`record_failure`: a failed holder is excluded for this request and backed off by later rankings); a
holder that dies mid-stream is replaced by the next one (resume). Pipeline requests:
`failover.replacement_route` (route_pipeline without excluded and, when possible, recently failed
nodes); a failed stage is excluded and the gateway re-plans without it at once (`replan`, as
placing.py does), up to `MAX_CHAIN_TRIES` chains. Failures are seen as the data plane sees them: a
dead node refuses the connection after `CONNECT_FAIL_S`; a node dying mid-stream goes silent, found
after the stream's hung deadline (`liveness.HUNG_FLOOR_S`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from core.errors import Busy, Unavailable
from dataplane.liveness import HEARTBEAT_S, HUNG_FLOOR_S
from dataplane.routing import failover, retry
from discovery import model_records as mr
from placement import choose_holder as holder_mod
from placement import from_adverts, plan, replan
from placement.cluster import Cluster, PlacementError, Plan
from simulations.catalog import MODELS
from simulations.serving import Request, Server
from simulations.sim_node import SPEED_REFERENCE_BYTES, SimNode

if TYPE_CHECKING:
    from simulations.mesh_sim import MeshSim

CONNECT_FAIL_S = 1.0  # a dead peer's connection attempt fails (refused, or the connect timeout)
HUNG_S = HUNG_FLOOR_S + HEARTBEAT_S  # a stream whose far end died is declared hung
CLIENT_RETRIES = 3  # a client retries a 429 after its Retry-After, this many times
NO_ROUTE_WAIT_S = 1.0
MAX_NO_ROUTE_WAITS = 8  # then the request fails: nothing to route to
REPLAN_GAP_S = 2.0  # one placement at a time


class Gateways:
    def __init__(self, sim: MeshSim) -> None:
        self.sim = sim
        self.plan: Plan | None = None
        self.pipeline: Server | None = None
        self.m: dict[str, Any] = {"served": 0, "failed": 0, "retries": 0, "busy_retries": 0, "replans": 0, "lost_with_gateway": 0,
                                  "moved_layers": 0, "latencies": [], "plan_wall_ms": [], "why": {}}
        self.routed: dict[str, set[str]] = {}  # node id -> gateways that routed to it
        self.pending_detect: dict[str, set[str]] = {}  # crashed node -> gateways still routing to it
        self.detected_s: list[float] = []
        self._last_replan = float("-inf")
        self._rid = 0

    @property
    def coordinator(self) -> SimNode:
        return self.sim.nodes[0]

    # --- placement ----------------------------------------------------------------------------------
    def _cluster(self, exclude: frozenset[str] = frozenset()) -> Cluster:
        sim, c = self.sim, self.coordinator
        now = sim.events.now
        if sim.cfg.mode == "records":
            sim.lookup(c, mr.record_key(sim.pipe_digest + "/offer"), limit=64)
        adverts = [c.advert_now()] + [p.advert for p in c.discovery.table.snapshot(now)
                                      if p.advert.node_id not in exclude]
        sites = {a.node_id: sim.by_id[a.node_id].site for a in adverts}
        return from_adverts.cluster_from_adverts(MODELS[sim.cfg.pipeline_model], adverts,
                                                 bytes_per_speed_token=SPEED_REFERENCE_BYTES, links=sim.links(),
                                                 sites=sites, concurrency=4)

    def _place(self, exclude: frozenset[str] = frozenset()) -> None:
        now = self.sim.events.now
        if now - self._last_replan < REPLAN_GAP_S:
            return
        self._last_replan = now
        t0 = time.perf_counter()
        try:
            cluster = self._cluster(exclude)
            new = plan.plan_split(cluster) if self.plan is None else replan.replan(self.plan, cluster)
        except PlacementError:
            return
        finally:
            self.m["plan_wall_ms"].append((time.perf_counter() - t0) * 1000)
        if self.plan is not None:
            self.m["replans"] += 1
            self.m["moved_layers"] += replan.moved_layers(self.plan, new)
        self._activate(new)

    def _activate(self, p: Plan) -> None:
        """Stage nodes load their ranges (LoadShard) and publish their new adverts."""
        from discovery.advert import ModelAdvert

        sim = self.sim
        digest, n_layers = sim.pipe_digest, MODELS[sim.cfg.pipeline_model].n_layers
        ranges = {s.node: (s.start, s.end) for s in p.stages}
        for n in sim.nodes:
            kept = tuple(m for m in n.models if m.digest != digest)
            if n.node_id in ranges:
                start, end = ranges[n.node_id]
                kept += (ModelAdvert(digest, sim.cfg.pipeline_model, n_layers, start, end, "torch", 4096),)
            if kept != n.models:
                n.models = kept
                n.discovery.publish_soon()
        self.plan = p
        self.pipeline = Server(sim.events, p.concurrency, sim.cfg.out_tokens * p.time_per_token_ms / 1000,
                               self.done, self.failed_on)
        self.pipeline_nodes = frozenset(ranges)

    # --- requests -----------------------------------------------------------------------------------
    def start(self, at: float) -> None:
        self._place()
        self.sim.events.after(0.5, self._arrival)

    def _arrival(self) -> None:
        sim = self.sim
        gateways = [n for n in sim.nodes if n.alive and n.receives]
        gw = gateways[sim.rng.randrange(len(gateways))]
        kind = "pipeline" if sim.rng.random() < 0.3 else "whole"
        self._rid += 1
        req = Request(self._rid, sim.events.now, kind, gateway=gw, attempts=retry.Attempts())
        self._route(req)
        sim.events.after(sim.rng.expovariate(sim.cfg.request_rate_per_s), self._arrival)

    def _route(self, req: Request) -> None:
        sim = self.sim
        gw: SimNode = req.gateway  # type: ignore[assignment]
        if not gw.alive:  # the client's own connection broke: no node can answer it
            self.m["lost_with_gateway"] += 1
            return None
        if sim.cfg.mode == "records":
            digest = sim.whole_digest if req.kind == "whole" else sim.pipe_digest
            key = mr.record_key(digest)
            last = gw.tracking.get(key)
            if last is None or sim.events.now - last > mr.RECORD_REPUT_S or (req.waits and sim.events.now - last > 1.0):
                sim.lookup(gw, key)
                if last is None:
                    req.waits += 1
                    sim.events.after(0.05 + 2 * sim._latency_s(gw, sim.nodes[-1]), self._route, req)
                    return None
        if req.kind == "whole":
            return self._route_whole(req, gw)
        return self._route_pipeline(req, gw)

    def _view(self, gw: SimNode) -> list:
        return [p.advert for p in gw.discovery.table.snapshot(self.sim.events.now)]

    def _route_whole(self, req: Request, gw: SimNode) -> None:
        sim, now = self.sim, self.sim.events.now
        ranking = holder_mod.rank_holders(sim.whole_digest, self._view(gw), gw.advert_now(), now, gw.failures,
                                          inflight=gw.inflight)
        d = retry.next_try(ranking.ranked, bool(ranking.saturated), req.attempts)  # type: ignore[arg-type]
        if isinstance(d, retry.TryHolder):
            self._send(req, gw, d.node_id)
        elif isinstance(d, retry.NoHolder):
            self._wait(req, "no holder known")
        elif isinstance(d.error, Busy) and req.client_tries < CLIENT_RETRIES:
            req.client_tries += 1
            self.m["busy_retries"] += 1
            req.attempts = retry.Attempts()
            sim.events.after(d.error.retry_after_s, self._route, req)
        else:
            self._fail(req, type(d.error).__name__)

    def _send(self, req: Request, gw: SimNode, node_id: str) -> None:
        sim = self.sim
        target = sim.by_id[node_id]
        self.routed.setdefault(node_id, set()).add(gw.node_id)
        if not target.alive or target.server is None:
            sim.events.after(CONNECT_FAIL_S, self._try_failed, req, node_id)
            return
        req.holder = node_id
        gw.inflight[node_id] = gw.inflight.get(node_id, 0) + 1
        target.server.submit(req)

    def _try_failed(self, req: Request, node_id: str) -> None:
        """The data plane saw node_id fail this request: book it (retry.py) and route again."""
        gw: SimNode = req.gateway  # type: ignore[assignment]
        now = self.sim.events.now
        self.m["retries"] += 1
        if retry.after_error(req.attempts, node_id, Unavailable("unreachable")):  # type: ignore[arg-type]
            gw.failures[node_id] = retry.record_failure(gw.failures.get(node_id), now)
        self._gateway_stopped_routing(gw, node_id)
        self._route(req)

    def _route_pipeline(self, req: Request, gw: SimNode) -> None:
        sim, now = self.sim, self.sim.events.now
        adverts = [gw.advert_now(), *self._view(gw)]
        exclude = frozenset(req.attempts.exclude)  # type: ignore[attr-defined]
        chain = failover.replacement_route(sim.pipe_digest, adverts, exclude, failover.recently_failed(gw.failures, now))
        if chain is None or self.pipeline is None:
            if self.plan is None or not (self.pipeline_nodes - exclude) >= self.pipeline_nodes:
                self._place(exclude)
            return self._wait(req, "no chain")
        req.chain = tuple(s.node for s in chain.stages)
        for nid in req.chain:
            self.routed.setdefault(nid, set()).add(gw.node_id)
        dead = next((n for n in req.chain if not sim.by_id[n].alive), None)
        if dead is not None:
            sim.events.after(CONNECT_FAIL_S, self._stage_failed, req, dead)
        elif set(req.chain) != set(self.pipeline_nodes):  # an old chain, re-placed since: refused
            sim.events.after(2 * sim._latency_s(gw, sim.nodes[0]), self._stage_failed, req, "")
        else:
            self.pipeline.submit(req)

    def _stage_failed(self, req: Request, node_id: str) -> None:
        gw: SimNode = req.gateway  # type: ignore[assignment]
        now = self.sim.events.now
        req.chain_tries += 1
        self.m["retries"] += 1
        if node_id:
            req.attempts.exclude.add(node_id)  # type: ignore[attr-defined]
            gw.failures[node_id] = retry.record_failure(gw.failures.get(node_id), now)
            self._gateway_stopped_routing(gw, node_id)
            self._place(frozenset(req.attempts.exclude))  # type: ignore[attr-defined]
        if req.chain_tries >= failover.MAX_CHAIN_TRIES + 2:
            return self._fail(req, "chains failed")
        self._route(req)

    def _wait(self, req: Request, why: str) -> None:
        req.waits += 1
        if req.waits > MAX_NO_ROUTE_WAITS:
            return self._fail(req, why)
        self.sim.events.after(NO_ROUTE_WAIT_S, self._route, req)

    def _fail(self, req: Request, why: str) -> None:
        self.m["failed"] += 1
        self.m["why"][why] = self.m["why"].get(why, 0) + 1

    # --- outcomes (Server callbacks) and crashes ----------------------------------------------------
    def done(self, req: Request) -> None:
        gw: SimNode = req.gateway  # type: ignore[assignment]
        if req.holder:
            gw.inflight[req.holder] = max(0, gw.inflight.get(req.holder, 1) - 1)
        req.done = True
        self.m["served"] += 1
        self.m["latencies"].append(self.sim.events.now - req.arrived_s)

    def failed_on(self, req: Request) -> None:
        """Its holder or a stage crashed mid-stream: the stream goes silent, then fails over."""
        gw: SimNode = req.gateway  # type: ignore[assignment]
        if req.kind == "whole":
            gw.inflight[req.holder] = max(0, gw.inflight.get(req.holder, 1) - 1)
            self.sim.events.after(HUNG_S, self._try_failed, req, req.holder)
        else:
            dead = next((n for n in req.chain if not self.sim.by_id[n].alive), "")
            self.sim.events.after(HUNG_S, self._stage_failed, req, dead)

    def on_crash(self, node: SimNode) -> None:
        self.pending_detect[node.node_id] = {g for g in self.routed.get(node.node_id, set())
                                             if self.sim.by_id[g].alive
                                             and self.sim.by_id[g].discovery.table.get(node.node_id) is not None}
        if not self.pending_detect[node.node_id]:
            del self.pending_detect[node.node_id]
        if node.server is not None:
            node.server.fail_all()
        if self.pipeline is not None and node.node_id in self.pipeline_nodes:
            self.pipeline.fail_all()

    def on_left(self, gw: SimNode, gone: str) -> None:
        self._gateway_stopped_routing(gw, gone)

    def _gateway_stopped_routing(self, gw: SimNode, node_id: str) -> None:
        waiting = self.pending_detect.get(node_id)
        if waiting is None or gw.node_id not in waiting:
            return
        waiting.discard(gw.node_id)
        if not waiting:
            del self.pending_detect[node_id]
            self.detected_s.append(self.sim.events.now - self.sim.crash_at[node_id])

    def crash_candidates(self, spare: list[SimNode], n: int) -> list[SimNode]:
        return self.sim.rng.sample(spare, min(n, len(spare)))

    def converged(self, node: SimNode) -> bool:
        sim = self.sim
        table = node.discovery.table
        if sim.cfg.mode == "records":  # every sampled neighbour known
            return all(sim.net.by_peer_id[p].node_id in table._peers for p in node.host.connections
                       if sim.net.by_peer_id[p].alive)
        return len(table) >= sum(1 for n in sim.nodes if n.alive) - 1

    def report(self) -> dict[str, Any]:
        m = self.m
        lat = sorted(m["latencies"])
        total = m["served"] + m["failed"]
        p = self.plan
        return {
            "requests_served": m["served"], "requests_failed": m["failed"],
            "failed_pct": round(100 * m["failed"] / total, 2) if total else None,
            "failed_why": dict(sorted(m["why"].items())),
            "lost_with_their_gateway": m["lost_with_gateway"],
            "retries": m["retries"], "busy_retries": m["busy_retries"],
            "crash_detection_routed_mean_s": round(sum(self.detected_s) / len(self.detected_s), 3) if self.detected_s else None,
            "crash_detection_routed_max_s": round(max(self.detected_s), 3) if self.detected_s else None,
            "crashes_routed_to_undetected": len(self.pending_detect),
            "latency_p50_s": round(lat[len(lat) // 2], 3) if lat else None,
            "latency_p95_s": round(lat[int(len(lat) * 0.95)], 3) if lat else None,
            "pipeline_stages": len(p.stages) if p else 0,
            "pipeline_tokens_per_s": round(p.tokens_per_s, 2) if p else None,
            "replans": m["replans"], "moved_layers": m["moved_layers"],
            "plan_wall_ms": round(max(m["plan_wall_ms"]), 2) if m["plan_wall_ms"] else None,
        }
