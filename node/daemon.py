"""The node daemon: identity, engines, gRPC service, discovery and the HTTP gateway, as one unit."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import time
from pathlib import Path

import grpc
from aiohttp import web

from dataplane import MeshRouter, NodeService, PeerChannels, build_server
from dataplane.load_gate import LoadGate
from dataplane.tls import MeshTls
from dataplane.weights import WeightsService
from dataplane.weights_store import WeightsError, WeightStore
from discovery.advert import Addresses, Load, ModelAdvert, NodeAdvert, Resources
from discovery.envelope import derive_subkey, mesh_key_from_secret
from discovery.fetch import HttpAdvertFetcher, advert_token
from discovery.identity import Identity
from discovery.netaddr import WILDCARDS, announce_ips
from discovery.peer_table import PeerTable
from discovery.rejects import RejectCounter
from discovery.service import DEFAULT_REFRESH_S, DEFAULT_TTL_S, Discovery
from engine.local_models import LocalModels
from engine.runner import EngineRunner
from gateway.app import build_app
from node.config import NodeConfig, is_loopback, lan_mode
from node.idle_unload import RangeUse, Usage, idle_ranges
from node.mesh_routes import add_mesh_routes, advert_handler
from node.model_loader import ModelManager
from node.observability import Observability
from node.resources import probe_resources
from node.upstream import UpstreamManager
from node.version import VERSION
from node.weights_routes import add_weights_routes, compute_file_adverts

log = logging.getLogger(__name__)
GRPC_GRACE_S = 1.0


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.identity = Identity.load_or_create(config.data_dir)
        self.node_id = self.identity.node_id
        self.name = config.name or f"{socket.gethostname()}-{self.node_id[:6]}"
        self.mesh_key = mesh_key_from_secret(config.mesh_secret)
        self.local = LocalModels()
        self.models = ModelManager(config, self._on_load_change)
        # OpenAI-compatible servers fronted as engines: their models join self.local while they answer
        self.upstreams = UpstreamManager(config.upstreams, self.local, max_queue=config.max_queue,
                                         on_change=self._on_load_change, on_load_change=self._on_load_change)
        self._load_lock = asyncio.Lock()
        self.table = PeerTable(self.node_id)
        self.http_port = config.http_port
        self.grpc_port = config.grpc_port
        self._grpc: grpc.aio.Server | None = None
        self._runner: web.AppRunner | None = None
        self.lan = lan_mode(config)
        disc_host = _discovery_host(config, self.lan)
        host = config.advertise_host or disc_host
        self.advertise_host = announce_ips(host)[0] if host in WILDCARDS else host
        # --lan with the API on loopback: peers still need our gRPC and GET /mesh/advert, so those two
        # listen beyond loopback (the gRPC token guards the first; the second is a signed envelope)
        self._mesh_site_needed = self.lan and is_loopback(config.http_host) and not is_loopback(self.advertise_host)
        self.mesh_http_port = 0
        self._mesh_runner: web.AppRunner | None = None
        token = derive_subkey(self.mesh_key, "grpc-token").hex()
        # mTLS between members unless --insecure-data-plane: our certificate rides in our signed advert;
        # we accept as clients only the certificates of the members in our PeerTable right now
        self.tls = None if config.insecure_data_plane else MeshTls(self.node_id, lambda: self.table.tls_certs(time.time()))
        self.channels = PeerChannels(token, tls=self.tls)
        # GET /mesh/advert: we fetch with the mesh's advert token, and on a LAN answer only those who send it
        self._fetcher = HttpAdvertFetcher(token=advert_token(self.mesh_key))
        self.advert_token_required = advert_token(self.mesh_key) if self.lan else None
        self.discovery = Discovery(
            self.identity,
            self.mesh_key,
            self.self_advert,
            self.table,
            mdns=config.mdns and self.lan,  # zeroconf only on a LAN: on loopback, multicast suffices
            multicast=config.mdns,
            allow_nodes=frozenset(config.allow_nodes) if config.allow_nodes else None,
            libp2p_port=config.libp2p_port,
            bootstrap=config.bootstrap,
            host_ip=disc_host,
            fetch_advert=self._fetcher,
            records=config.records,
            ttl_s=config.advert_ttl_s,
            refresh_s=config.advert_ttl_s * DEFAULT_REFRESH_S / DEFAULT_TTL_S,
        )
        self.router = MeshRouter(self.name, self.local, self.self_advert, self.peer_adverts, self.channels, self.describe_self,
                                 replicas=config.replicas,
                                 lookup=self.discovery.lookup_model if config.records else None)
        self.observability = Observability(self)  # /metrics, /mesh/stats, the dashboard
        self._is_member = None if self.tls is None else (lambda node_id: self.table.is_member(node_id, time.time()))
        self._gate = LoadGate()
        self.service = NodeService(self.local, self.discovery.signed_advert, token, self.load_shard,
                                   load_gate=self._gate, is_member=self._is_member)
        # ranges loaded on request (LoadShard) and when each model was last used: idle ones are unloaded
        self._requested: set[str] = set()
        self._usage = Usage()
        self._unload_task: asyncio.Task[None] | None = None
        self._bg: set[asyncio.Task] = set()
        self._token = token
        self._stage_rate = 0.0
        self._stage_steps = 0
        self._stage_compute_s = 0.0
        self._file_adverts: tuple = ()
        # weights: the files we have are sources for members; ranges we lack are fetched (docs/weights.md)
        self.weight_store = WeightStore(config.data_dir, self.channels, node_id=self.node_id,
                                        disk_budget_bytes=config.disk_budget_bytes, serve_streams=config.serve_streams,
                                        rejects=RejectCounter(logging.getLogger("meshllm.weights"), what="weights"),
                                        on_change=self._on_weights_change)
        self.weights_service = WeightsService(self.weight_store.lookup, token, config.serve_streams,
                                              is_member=self._is_member)

    # --- lifecycle -----------------------------------------------------------------------------------
    def _load_models(self) -> None:
        for local in self.models.load_initial():
            self.local.add(local)
            self._usage.touch(local.model.digest, time.monotonic())  # idle from now on, but never unloaded

    async def load_shard(self, digest: str, start: int, end: int) -> None:
        """LoadShard: load layers of an offered GGUF (idempotent for the range already held)."""
        async with self._load_lock:
            held = self.local.resolve(digest)
            if held is not None:
                if (held.shard.start, held.shard.end) == (start, end):
                    return
                raise ValueError(f"this node already holds {held.shard}")
            if self.models.offered(digest) is None or self.weight_store.lookup(digest) is not None:
                # not a whole file of ours: fetch the range's tensors from the members holding them
                alias = next((f.alias for a in self.peer_adverts() for f in a.files if f.digest == digest), "")
                try:
                    path = await self.weight_store.ensure_range(digest, start, end, self.peer_adverts(), alias)
                except WeightsError as e:
                    raise ValueError(str(e)) from None
                await asyncio.to_thread(self.models.add_cached, str(path), digest, alias)
            local = await asyncio.to_thread(self.models.load_range, digest, start, end)
            self.local.add(local)
            self._requested.add(digest)
            self._usage.touch(digest, time.monotonic())
        self.discovery.publish_soon()

    async def unload_idle(self, now_s: float) -> list[str]:
        """Unloads the ranges loaded on request that have served nothing for --unload-idle-s."""
        async with self._load_lock:  # never while LoadShard adds a range
            self._touch_busy(now_s)
            uses = [RangeUse(lm.model.digest, lm.model.digest in self._requested,
                             self._usage.last_s(lm.model.digest, now_s), lm.runner.load.active + lm.runner.load.queued)
                    for lm in self.local.all()]
            # decided and removed in one step of the loop: no request can be admitted in between
            dropped = [lm for d in idle_ranges(uses, now_s, self.config.unload_idle_s)
                       if (lm := self.local.remove(d)) is not None]
        if dropped:
            self.discovery.publish_soon()  # peers stop routing here before the engines go
        for lm in dropped:
            self._requested.discard(lm.model.digest)
            self._usage.forget(lm.model.digest)
            self._gate.unloaded(lm.model.digest, lm.shard.start, lm.shard.end)
            await asyncio.to_thread(_close_and_collect, lm.runner)
            self.models.release_range(lm)
            log.info("unloaded idle layers [%d, %d) of %s", lm.shard.start, lm.shard.end, lm.model.alias)
        return [lm.model.digest for lm in dropped]

    async def _unload_idle_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.unload_check_s)
            try:
                await self.unload_idle(time.monotonic())
            except Exception:
                log.exception("unloading idle ranges failed")

    def _touch_busy(self, now_s: float) -> None:
        self._usage.observe([lm.model.digest for lm in self.local.all() if lm.runner.load.active or lm.runner.load.queued],
                            now_s)

    def _may_run_stages(self) -> bool:
        c = self.config
        return bool(c.shards or c.offers or c.engine == "torch" or c.memory_budget_bytes is not None)

    def _on_stage_step(self, digest: str, n_positions: int, compute_s: float) -> None:
        """Decode steps of pipeline stages: their rate is the speed a shard-only node advertises."""
        self.observability.on_stage_step(digest, n_positions, compute_s)
        self._usage.touch(digest, time.monotonic())
        if n_positions != 1 or compute_s <= 0:
            return  # prompt steps say little about decode speed
        self._stage_steps += 1
        self._stage_compute_s += compute_s
        rate = 1.0 / compute_s
        self._stage_rate = rate if self._stage_rate == 0 else 0.9 * self._stage_rate + 0.1 * rate

    def _on_load_change(self) -> None:
        # Routing elsewhere reads our load from adverts: discovery pushes it, bounded (Publisher.load_changed).
        self._touch_busy(time.monotonic())
        if self._runner is not None:
            self.discovery.load_changed()

    async def start(self) -> None:
        await asyncio.to_thread(self._load_models)
        await self.upstreams.start()
        await asyncio.to_thread(self._start_weights)
        handlers = self.service.handlers() | self.weights_service.handlers()
        if self._may_run_stages():
            # torch is imported only by nodes that can hold layer ranges (seconds of start-up saved).
            from dataplane.stage import PipelineService

            handlers |= PipelineService(self.local, self.channels, self._token, on_step=self._on_stage_step,
                                        is_member=self._is_member).handlers()
        server = build_server(handlers)
        grpc_host = "0.0.0.0" if self._mesh_site_needed else _grpc_bind_host(self.config.http_host)
        address = f"{grpc_host}:{self.config.grpc_port}"
        if self.tls is None:
            log.warning("--insecure-data-plane: gRPC between members is plaintext, guarded by the mesh token only")
            self.grpc_port = server.add_insecure_port(address)
        else:
            self.grpc_port = server.add_secure_port(address, self.tls.server_credentials())
        await server.start()
        self._grpc = server
        app = build_app(self.router, api_keys=self.config.api_keys, api_keys_file=self.config.api_keys_file,
                        header_timeout_s=self.config.header_timeout_s, body_timeout_s=self.config.body_timeout_s)
        add_mesh_routes(app, self)
        add_weights_routes(app, self)
        self.observability.attach(app)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.http_host, self.config.http_port)
        await site.start()
        self.http_port = self.mesh_http_port = self._runner.addresses[0][1]
        if self._mesh_site_needed:
            self._mesh_runner = await self._start_mesh_site()
        await self.discovery.start()
        self._unload_task = asyncio.create_task(self._unload_idle_loop(), name="unload-idle")

    def _start_weights(self) -> None:
        """Blocking: manifests of the files we offer (hashed once, kept in the data dir), the cache's
        entries offered too, and the file adverts that name what we hold."""
        self.weight_store.start([(m.digest, m.alias, Path(m.path)) for m in self.models.offered_files()])
        for h in self.weight_store.held():
            if h.cached:
                self.models.add_cached(str(h.path), h.digest, h.alias)
        self._file_adverts = compute_file_adverts(self)

    def _on_weights_change(self) -> None:
        """A fetch completed: advertise the bytes we now hold (we are a source in turn)."""
        async def refresh() -> None:
            try:
                for h in self.weight_store.held():
                    if h.cached:
                        await asyncio.to_thread(self.models.add_cached, str(h.path), h.digest, h.alias)
                self._file_adverts = await asyncio.to_thread(compute_file_adverts, self)
            except Exception:
                log.exception("advertising the weights we hold failed")
                return
            self.discovery.publish_soon()

        task = asyncio.get_running_loop().create_task(refresh())
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _start_mesh_site(self) -> web.AppRunner:
        """Only GET /mesh/advert, on every address (an ephemeral port), for LAN peers' fetches."""
        app = web.Application()
        app.router.add_get("/mesh/advert", advert_handler(self.discovery.signed_advert, self.advert_token_required))
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "0.0.0.0", 0).start()
        self.mesh_http_port = runner.addresses[0][1]
        return runner

    async def stop(self) -> None:
        if self._unload_task is not None:
            self._unload_task.cancel()
            await asyncio.gather(self._unload_task, return_exceptions=True)
            self._unload_task = None
        if self._runner is not None:
            log.debug("stop: discovery (goodbye)")
            await self.discovery.stop()  # goodbye first, so peers stop routing here at once
            log.debug("stop: http")
            await self._runner.cleanup()
            self._runner = None
        if self._mesh_runner is not None:
            await self._mesh_runner.cleanup()
            self._mesh_runner = None
        if self._grpc is not None:
            log.debug("stop: grpc")
            await self._grpc.stop(GRPC_GRACE_S)
            self._grpc = None
        log.debug("stop: channels and engines")
        await self.upstreams.stop()
        await self.channels.close()
        await self._fetcher.close()
        await asyncio.to_thread(self.local.close)
        log.debug("stop: done")

    @property
    def http_url(self) -> str:
        return f"http://{self.config.http_host}:{self.http_port}"

    # --- what we tell the mesh -----------------------------------------------------------------------
    def self_advert(self) -> NodeAdvert:
        """Our advert without seq/issued_at/ttl (discovery stamps those when it signs)."""
        resources = probe_resources(cuda=self.config.device.startswith("cuda"))
        runners = [lm.runner for lm in self.local.all()]
        return NodeAdvert(
            node_id=self.node_id,
            name=self.name,
            version=VERSION,
            public_key=self.identity.public_key_raw,
            addresses=Addresses(
                http=f"{self.advertise_host}:{self.mesh_http_port or self.http_port}",
                grpc=f"{self.advertise_host}:{self.grpc_port}" if self._grpc is not None else "",
                libp2p=tuple(self.discovery.libp2p_addrs),
            ),
            models=tuple(
                ModelAdvert(
                    digest=lm.model.digest,
                    alias=lm.model.alias,
                    n_layers=lm.model.n_layers,
                    start=lm.shard.start,
                    end=lm.shard.end,
                    engine=lm.engine,
                    ctx=_context_of(lm.runner.engine),
                )
                for lm in self.local.all()
            ),
            resources=Resources(
                device=resources.device,
                vram_total_bytes=resources.vram_total_bytes,
                vram_free_bytes=resources.vram_free_bytes,
                ram_total_bytes=resources.ram_total_bytes,
                ram_free_bytes=resources.ram_free_bytes,
                speed_tok_s=round(max([r.tokens_per_s for r in runners] + [self._stage_rate]), 2),
                budget_free_bytes=self.models.budget_free_bytes,
            ),
            load=Load(
                active=sum(r.load.active for r in runners),  # pipeline stages' sessions included
                queued=sum(r.load.queued for r in runners),
                capacity=sum(r.load.capacity for r in runners),
            ),
            seq=0,
            issued_at=0.0,
            ttl_s=0.0,
            files=self._file_adverts,
            tls_cert=self.tls.cert_pem if self.tls is not None else "",
            serve_streams=self.config.serve_streams,
        )

    def peer_adverts(self) -> list[NodeAdvert]:
        return [peer.advert for peer in self.table.snapshot(time.time())]

    def describe_self(self) -> dict:
        me = self.self_advert().to_dict()
        for key in ("seq", "issued_at", "ttl_s"):
            me.pop(key, None)
        me["rejected_adverts"] = self.discovery.rejects
        me["upstreams"] = self.upstreams.describe()
        me["loading"] = self.models.progress.snapshot()  # model and range loads, for the dashboard
        me["weights"] = {**self.weight_store.snapshot(), "served_bytes": self.weights_service.stats.bytes_served,
                         "serve_calls": self.weights_service.stats.calls,
                         "serve_refused_busy": self.weights_service.stats.refused_busy}
        me["pipeline"] = {
            "decode_steps": self._stage_steps,
            "decode_step_ms": round(1000 * self._stage_compute_s / self._stage_steps, 3) if self._stage_steps else 0.0,
        }
        return me


def _close_and_collect(runner: EngineRunner) -> None:
    """Blocking: stops the runner and its engine, then collects the weights' reference cycles now."""
    runner.close()
    gc.collect()


def _context_of(engine: object) -> int:
    return int(getattr(engine, "n_ctx", 0) or getattr(engine, "max_context", 0))


def _discovery_host(config: NodeConfig, lan: bool) -> str:
    """Where discovery announces and listens: loopback unless the node takes part in the LAN."""
    if not lan:
        return "127.0.0.1" if config.http_host.lower() == "localhost" else config.http_host
    if config.advertise_host:
        return config.advertise_host
    return config.http_host if not is_loopback(config.http_host) else "0.0.0.0"


def _grpc_bind_host(http_host: str) -> str:
    return "[::]" if http_host in ("::", "") else http_host
