"""The node daemon: identity, engines, the HTTP gateway; started and stopped as one unit."""

from __future__ import annotations

import asyncio
import logging
import socket

from aiohttp import web

from engine.llama_cpp_engine import LlamaCppEngine
from engine.model_file import load_model_file
from engine.runner import EngineRunner
from gateway.app import build_app
from node.backend import NodeBackend
from node.config import NodeConfig
from node.identity import Identity
from node.local_models import LocalModel, LocalModels
from node.resources import probe_resources
from node.version import VERSION

log = logging.getLogger(__name__)


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.identity = Identity.load_or_create(config.data_dir)
        self.node_id = self.identity.node_id
        self.name = config.name or f"{socket.gethostname()}-{self.node_id[:6]}"
        self.local = LocalModels()
        self.backend = NodeBackend(self.name, self.local, self.describe_self)
        self.http_port = config.http_port
        self._runner: web.AppRunner | None = None

    def _load_models(self) -> None:
        """Blocking: hashes (or reads the cached digest of) each GGUF and loads it into llama.cpp."""
        for spec in self.config.models:
            model = load_model_file(spec, self.config.data_dir)
            engine = LlamaCppEngine(model, n_ctx=self.config.ctx_size, threads=self.config.threads)
            runner = EngineRunner(engine, max_queue=self.config.max_queue, on_load_change=self._on_load_change)
            self.local.add(LocalModel(model, runner, engine.engine_name))
            log.info("loaded %s (%s, %d layers)", model.alias, model.short_digest, model.n_layers)

    def _on_load_change(self) -> None:
        """Hook for pushing fresh load figures to peers (the advertiser subscribes here)."""

    async def start(self) -> None:
        await asyncio.to_thread(self._load_models)
        self._runner = web.AppRunner(build_app(self.backend), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.http_host, self.config.http_port)
        await site.start()
        self.http_port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await asyncio.to_thread(self.local.close)

    @property
    def http_url(self) -> str:
        return f"http://{self.config.http_host}:{self.http_port}"

    def describe_self(self) -> dict:
        resources = probe_resources()
        speed = max((lm.runner.tokens_per_s for lm in self.local.all()), default=0.0)
        active = sum(lm.runner.load.active for lm in self.local.all())
        queued = sum(lm.runner.load.queued for lm in self.local.all())
        capacity = sum(lm.runner.load.capacity for lm in self.local.all())
        return {
            "node_id": self.node_id,
            "name": self.name,
            "version": VERSION,
            "models": [
                {
                    "digest": lm.model.digest,
                    "alias": lm.model.alias,
                    "n_layers": lm.model.n_layers,
                    "start": lm.layer_range[0],
                    "end": lm.layer_range[1],
                    "whole": lm.whole,
                    "engine": lm.engine,
                    "ctx": lm.runner.engine.n_ctx,  # type: ignore[attr-defined]
                }
                for lm in self.local.all()
            ],
            "resources": {
                "device": resources.device,
                "vram_total_bytes": resources.vram_total_bytes,
                "vram_free_bytes": resources.vram_free_bytes,
                "ram_total_bytes": resources.ram_total_bytes,
                "ram_free_bytes": resources.ram_free_bytes,
                "speed_tok_s": round(speed, 2),
            },
            "load": {"active": active, "queued": queued, "capacity": capacity},
            "addresses": {"http": f"{self.config.http_host}:{self.http_port}", "grpc": "", "libp2p": []},
        }
