"""The node's upstreams (`--upstream URL`): their models join the node's own, while they answer.

Each upstream is polled every `poll_s` (1 s): `GET /v1/models` says it is alive and which models it
serves, and its kind's load signal is read (`engine/upstream_signals.py`). A model that appears is added
to the node's LocalModels (an `UpstreamRunner` over an `UpstreamEngine`) and the advert is re-published;
an upstream that stops answering (connection refused or reset: at once; timeouts or error answers: after
DOWN_AFTER_S of them, since a busy server may just be slow to list its models) has its models taken out
and the advert re-published, so peers stop routing there within one advert period; they come back
when it answers again.

llama-cpp-python's server (`serial_server`) generates one answer at a time and ends the one in progress
when any other request arrives, a model list included: the node sends it one request at a time (the
poll takes the same slot as a generation) and skips the poll while a generation is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.local_models import LocalModel, LocalModels
from engine.upstream import UpstreamClient, UpstreamConfig, UpstreamDown, UpstreamEngine
from engine.upstream_runner import UpstreamRunner
from engine.upstream_signals import (
    Signals,
    kind_from_metrics,
    kind_from_owner,
    ollama_digests,
    parse_metrics,
    parse_models,
    parse_ollama_ps,
    parse_slots,
    serial_server,
)
from shard.spec import ShardSpec

log = logging.getLogger(__name__)
DOWN_AFTER_S = 10.0  # an upstream silent (not refusing) this long is withdrawn


@dataclass(slots=True)
class _Upstream:
    client: UpstreamClient
    slots: asyncio.Semaphore
    up: bool | None = None  # None: never heard from
    serial: bool = False  # one generation at a time, no poll meanwhile (`serial_server`)
    held: dict[str, LocalModel] = field(default_factory=dict)  # model id -> ours (kept while down)
    serving: set[str] = field(default_factory=set)  # model ids in LocalModels now
    failing_since: float | None = None  # monotonic time of the first failed poll in a row

    @property
    def config(self) -> UpstreamConfig:
        return self.client.config

    @property
    def kind(self) -> str | None:
        return self.client.kind


class UpstreamManager:
    def __init__(self, configs: tuple[UpstreamConfig, ...], local: LocalModels, *, max_queue: int,
                 on_change: Callable[[], None], on_load_change: Callable[[], None]) -> None:
        self._local = local
        self._max_queue = max_queue
        self._on_change = on_change
        self._on_load_change = on_load_change
        self._upstreams = [_Upstream(UpstreamClient(c), asyncio.Semaphore(c.concurrency)) for c in configs]
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Reads every upstream once (a node starts serving what answers now), then polls."""
        if not self._upstreams:
            return
        await asyncio.gather(*(self.poll(u) for u in self._upstreams))
        self._task = asyncio.create_task(self._loop(), name="upstreams")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for u in self._upstreams:
            for lm in u.held.values():
                if lm.model.digest not in u.serving:
                    lm.runner.close()  # those in LocalModels are closed with it
            await u.client.close()

    def describe(self) -> list[dict]:
        """For /mesh/self (open to whoever reaches /mesh/*): no URL and no key, only what is served."""
        return [{"kind": u.kind, "up": bool(u.up),
                 "models": sorted(u.held[i].model.alias for i in u.serving)} for u in self._upstreams]

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(min(u.config.poll_s for u in self._upstreams))
            await asyncio.gather(*(self.poll(u) for u in self._upstreams))

    async def poll(self, u: _Upstream) -> None:
        timeout_s = max(0.2, min(2.0, u.config.poll_s * 1.5))
        if u.serial and u.slots.locked():
            # A generation holds the one slot, and a model list now would end it: the generation's own
            # bytes are the sign of life. Silent that long, it counts as a failed poll.
            silent_s = time.monotonic() - u.client.last_heard
            u.failing_since = None
            if silent_s >= DOWN_AFTER_S:  # as DOWN_AFTER_S of failed polls would be (a long prefill too)
                self._down(u, f"a generation has been silent for {silent_s:.0f} s")
            return
        try:
            async with u.slots if u.serial else contextlib.nullcontext():
                listing = await u.client.get_json("/v1/models", timeout_s)
            if u.client.kind is None:  # first heard, or back after down (nothing of it is served then)
                u.client.kind = await self._detect(u, listing, timeout_s)
                serial = serial_server(listing)
                if serial != u.serial:  # a new upstream starts with its concurrency's slots, not serial
                    self._reslot(u, serial)
            kind = u.client.kind
            digests = await self._ollama_digests(u, timeout_s) if kind == "ollama" else None
            models, skipped = parse_models(listing, kind, u.config.models, digests)
        except UpstreamDown as e:
            # Refused or reset: nothing listens there, down now. Silent or failing: maybe only busy
            # (llama-cpp-python answers nothing else while it generates, for anyone), so down once it has
            # failed every poll for DOWN_AFTER_S; requests in flight time out on their own meanwhile.
            now = time.monotonic()
            u.failing_since = u.failing_since if u.failing_since is not None else now
            if e.refused or now - u.failing_since >= DOWN_AFTER_S:
                self._down(u, str(e))
            return
        except ValueError as e:
            self._down(u, str(e))
            return
        u.failing_since = None
        if u.up is not True:
            log.info("upstream %s (%s) is up: %s", u.config.base, u.kind,
                     ", ".join(m.name for m in models) or "no model to serve")
            for why in skipped:
                log.warning("upstream %s: not serving %s", u.config.base, why)
        u.up = True
        changed = False
        wanted = {m.model_id: m for m in models}
        for model_id in list(u.serving - wanted.keys()):
            changed |= self._withdraw(u, model_id)
        for model_id, m in wanted.items():
            if model_id in u.serving:
                continue
            lm = u.held.get(model_id)
            if lm is None:
                engine = UpstreamEngine(u.client, m.name, model_id, m.context_length)
                runner = UpstreamRunner(engine, slots=u.slots, parallel=1 if u.serial else u.config.concurrency,
                                        max_queue=self._max_queue, on_load_change=self._on_load_change)
                lm = LocalModel(engine.model, runner, "upstream", ShardSpec.whole_model(model_id, 1))
                u.held[model_id] = lm
            try:
                self._local.add(lm)
            except ValueError as e:  # the same model through two upstreams of this node
                log.warning("upstream %s: %s", u.config.base, e)
                continue
            u.serving.add(model_id)
            changed = True
        await self._read_signals(u, [u.held[i].runner.upstream.served_name for i in u.serving], timeout_s)  # type: ignore[attr-defined]
        if changed:
            self._on_change()

    def _reslot(self, u: _Upstream, serial: bool) -> None:
        """The upstream's slots: one for a server that ends an answer when another request arrives
        (`serial_server`), else its concurrency. Runners built for the other kind go (a different server
        now answers at that address; none of them is served while it was down)."""
        for lm in u.held.values():
            lm.runner.close()
        u.held.clear()
        u.serial = serial
        u.slots = asyncio.Semaphore(1 if serial else u.config.concurrency)

    def _withdraw(self, u: _Upstream, model_id: str) -> bool:
        u.serving.discard(model_id)
        return self._local.remove(model_id) is not None

    def _down(self, u: _Upstream, why: str) -> None:
        if u.up is not False:
            log.warning("upstream %s is down (%s): withdrawing %d model(s)", u.config.base, why, len(u.serving))
        u.up = False
        u.client.kind = None  # another server may come back at that address
        changed = False
        for model_id in list(u.serving):
            changed |= self._withdraw(u, model_id)
        if changed:
            self._on_change()

    async def _detect(self, u: _Upstream, listing: object, timeout_s: float) -> str:
        kind = kind_from_owner(listing)
        if kind is not None:
            return kind
        try:
            status, body = await u.client.get("/api/version", timeout_s)
            if status == 200 and b'"version"' in body:
                return "ollama"
            status, body = await u.client.get("/metrics", timeout_s)
            if status == 200 and (kind := kind_from_metrics(body[:1 << 20].decode("utf-8", "replace"))):
                return kind
            status, body = await u.client.get("/slots", timeout_s)
            if status == 200 and body.lstrip().startswith(b"["):
                return "llama-server"
        except UpstreamDown:
            pass
        return "openai"

    async def _ollama_digests(self, u: _Upstream, timeout_s: float) -> dict[str, str]:
        try:
            return ollama_digests(await u.client.get_json("/api/tags", timeout_s))
        except UpstreamDown:
            return {}

    async def _read_signals(self, u: _Upstream, names: list[str], timeout_s: float) -> None:
        """The kind's load signal; an upstream without one leaves the node's in-flight count alone."""
        before = {n: u.client.signals.get(n) for n in names}
        try:
            if u.kind in ("vllm", "sglang"):
                status, body = await u.client.get("/metrics", timeout_s)
                text = body.decode("utf-8", "replace") if status == 200 else ""
                u.client.signals = {n: parse_metrics(text, u.kind, n) for n in names}
            elif u.kind == "llama-server":
                status, body = await u.client.get("/slots", timeout_s)
                if status == 200:
                    signals = parse_slots(json.loads(body))
                else:  # /slots is off: /health says 503 while it has no free slot or is loading
                    status, _ = await u.client.get("/health", timeout_s)
                    signals = Signals(running=None, waiting=1 if status == 503 else None)
                u.client.signals = {n: signals for n in names}
            elif u.kind == "ollama":
                ps = parse_ollama_ps(await u.client.get_json("/api/ps", timeout_s), names)
                u.client.signals = {n: ps for n in names}
        except (UpstreamDown, ValueError):
            return  # the model list answered: the upstream is up; its load is simply unknown this time
        if {n: u.client.signals.get(n) for n in names} != before:
            self._on_load_change()
