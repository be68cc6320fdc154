"""MeshRouter: the gateway's backend on every node — serve here, or route to the best holder.

Each request takes one `MeshView` (our advert built once, one snapshot of the peers), resolves the
model in its catalog, then opens the best whole-model holder under the one retry policy
(`dispatch.py`, `retry.py`), else the cheapest chain of layer ranges (placing an offered model first,
`placing.py`). A holder that fails mid-stream is replaced (`resume.py`); a chain whose stage ran out of
KV blocks is waited out and replayed (`kv_wait.py`). In records mode (`lookup`
given) a model no peer in the table holds, or one whose holders all failed, is looked up in the DHT
once and the request retried when the record answers (`lookup.py`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

from core.errors import Busy, MeshError, ModelNotFound, Refused, Unavailable
from core.serving import Embeddings, Generation, ModelListing, aclose, first_chunk
from core.types import Chunk, EmbedInput, GenerationRequest
from dataplane.calls import remote_generate
from dataplane.channels import Endpoint, PeerChannels
from dataplane.routing import kv_wait
from dataplane.routing.dispatch import Dispatcher, prefix_key
from dataplane.routing.failover import (
    MAX_CHAIN_TRIES,
    blame,
    describe,
    least_busy,
    recently_failed,
    replacement_route,
    replica_route,
)
from dataplane.routing.lookup import LOOKUP_WAIT_S, Lookup, await_view, has_holder, known
from dataplane.routing.placing import Placer
from dataplane.routing.resume import Served, resume_request, resuming
from dataplane.routing.retry import Attempts
from dataplane.routing.view import Catalog, MeshView, Target, catalog_key, list_models, resolve
from dataplane.stage_wire import encode_chain
from discovery.advert import NodeAdvert
from engine.local_models import LocalModels
from placement.cluster import Stage

log = logging.getLogger(__name__)


class MeshRouter:
    def __init__(
        self,
        node_name: str,
        local: LocalModels,
        self_advert: Callable[[], NodeAdvert],
        peer_adverts: Callable[[], list[NodeAdvert]],
        channels: PeerChannels,
        describe_self: Callable[[], dict],
        clock: Callable[[], float] = time.time,
        replicas: int = 1,
        lookup: Lookup | None = None,
        lookup_wait_s: float = LOOKUP_WAIT_S,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.node_name = node_name
        self._lookup = lookup  # records mode: Discovery.lookup_model (holders are found, not flooded)
        self._lookup_wait_s = lookup_wait_s
        self.local = local
        self._self_advert = self_advert
        self._peer_adverts = peer_adverts
        self._channels = channels
        self._describe_self = describe_self
        self.dispatch = Dispatcher(local, channels, clock)
        self.placer = Placer(channels, replicas=replicas)
        self.streams: dict[str, int] = {}  # pipeline streams we drive now, per node: a burst spreads at once
        self._waiting: dict[str, int] = {}  # streams waiting for a stage's KV blocks, per model digest
        self._draw = draw  # [0, 1) for spreading those waits (random.random; tests pass their own)
        self._catalog: tuple[tuple, Catalog] | None = None  # (catalog_key, catalog): one per set of adverts
        if not channels.has_directory:
            channels.set_directory(self.grpc_endpoint_of)  # stages resolve next hops in our PeerTable

    def view(self) -> MeshView:
        """One consistent picture of the mesh: our advert built once, one snapshot of the peers, and the
        catalog of that set of adverts (computed when the set changed, else reused)."""
        me, peers = self._self_advert(), tuple(self._peer_adverts())
        key = catalog_key(me, peers)
        if self._catalog is None or self._catalog[0] != key:
            view = MeshView(me, peers)
            self._catalog = (key, view.catalog)
            return view
        return MeshView(me, peers, self._catalog[1])

    def grpc_endpoint_of(self, node_id: str) -> Endpoint | None:
        """A peer's advertised gRPC address and TLS certificate, from the PeerTable alone."""
        for advert in self._peer_adverts():
            if advert.node_id == node_id:
                return Endpoint(advert.addresses.grpc, advert.tls_cert) if advert.addresses.grpc else None
        return None

    def list_models(self) -> list[ModelListing]:
        return list_models(self.view())

    def _resolve(self, view: MeshView, name: str) -> tuple[Target, list[str]]:
        listings = list_models(view)
        available = sorted({m.alias for m in listings})
        target = resolve(listings, name)
        if target is None:
            raise ModelNotFound(name, available)
        return target, available

    async def _find(self, name: str) -> tuple[MeshView, Target, list[str]]:
        """The view and the model it names; in records mode an unknown name is looked up in the DHT
        first (bounded wait), then a 404 if still unknown."""
        view = self.view()
        if self._lookup is None or known(view, name):
            return view, *self._resolve(view, name)
        self._lookup(name)
        found = await await_view(self.view, lambda v: known(v, name), self._lookup_wait_s)
        if found is None:
            available = sorted({m.alias for m in list_models(self.view())})
            raise ModelNotFound(name, available, f"The model '{name}' does not exist on this mesh: no holder found "
                                f"in the DHT within {self._lookup_wait_s:g} s. Available models: "
                                f"{', '.join(available) or 'none'}")
        return found, *self._resolve(found, name)

    async def _or_looked_up(self, view: MeshView, digest: str, exclude: set[str],
                            attempt: Callable[[MeshView], Awaitable[Served]], wait_s: float | None = None) -> Served:
        """`attempt(view)`; in records mode, when it finds no working holder, the model is looked up once
        and, when a holder outside `exclude` appears within the bounded wait (`wait_s`: what is left of
        the request's, else the whole), attempted once more."""
        try:
            return await attempt(view)
        except Unavailable as e:
            if self._lookup is None:
                raise
            self._lookup(digest)
            avoid = frozenset(exclude)
            bound_s = self._lookup_wait_s if wait_s is None else max(0.0, wait_s)
            found = await await_view(self.view, lambda v: has_holder(v, digest, avoid), bound_s)
            if found is None:
                raise Unavailable(f"{e.message}; no other holder found in the DHT within {self._lookup_wait_s:g} s",
                                  code=e.code) from None
            log.info("retrying %s after a DHT lookup", digest[:12])
            return await attempt(found)

    # --- generation ----------------------------------------------------------------------------------
    async def open_generation(self, model: str, request: GenerationRequest) -> Generation:
        started = time.monotonic()
        view, target, available = await self._find(model)
        attempts = Attempts()
        # one bounded DHT wait per request: a lookup for the name and one after a failed holder share it
        left_s = self._lookup_wait_s - (time.monotonic() - started)
        served = await self._open(view, target, available, request, attempts, lookup_wait_s=left_s)

        async def reopen(failed: Served, error: Unavailable | Busy, text: str, ids: list[int]) -> Served:
            if isinstance(error, Busy):  # a stage's KV pool is spent: healthy, so not blamed; wait, replay
                return await self._wait_and_replay(target, available, failed.request or request, failed, error,
                                                   ids, attempts.exclude)
            view = self.view()
            if failed.node_id is not None:  # a whole-model holder: another continues from the text
                self.dispatch.record_failure(failed.node_id)
                attempts.exclude.add(failed.node_id)
                resumed = resume_request(request, text, len(ids))
                if resumed is None:
                    raise Unavailable("the stream has all its tokens")
                opened = await self._open(view, target, available, resumed, attempts)
                return replace(opened, offset=len(ids))
            # a pipeline: exclude the stage that failed; the same request resumes from its ids
            failure = blame(failed.chain, error.message)
            names = {a.node_id: a.name for a in view.adverts}
            why = describe(failure, names)
            self.dispatch.record_failure(failure.stage.node)
            attempts.exclude.add(failure.stage.node)
            base = failed.request or request
            try:
                continued = resume_request(request, text, len(ids))  # a whole holder continues from the text
                if continued is None:
                    raise Unavailable("the stream has all its tokens")

                async def attempt(view: MeshView) -> Served:
                    held = await self._whole(view, target, continued, attempts)
                    if held is not None:
                        return replace(held, offset=len(ids))
                    resume = tuple(ids[failed.offset:])
                    try:
                        opened = await self._open_pipeline(view, target, available, base, attempts.exclude, resume)
                    except Busy as e:  # the replacement is healthy but full: wait for room, as a new stream does
                        log.warning("%s; the replacement has no room (waits, then replays): %s", why, e.message)
                        opened = await self._when_room(target, available, base, e, resume, attempts.exclude)
                    return replace(opened, offset=failed.offset)

                opened = await self._or_looked_up(view, target.digest, attempts.exclude, attempt)
            except MeshError as e:
                raise Unavailable(f"{why}; no replacement: {e.message}", code="pipeline_failed") from None
            log.info("%s; resuming on %s", why, opened.generation.served_by)
            return opened

        generation = served.generation
        generation.rest = resuming(served, request, reopen)
        return generation

    async def _wait_and_replay(self, target: Target, available: list[str], request: GenerationRequest,
                               failed: Served, error: Busy, ids: list[int], exclude: set[str]) -> Served:
        """`failed`'s chain ended with Busy (a stage out of KV blocks), so its sessions are closed:
        replay the prompt and `ids` once a chain has room (`_when_room`)."""
        opened = await self._when_room(target, available, request, error, tuple(ids[failed.offset:]), exclude)
        log.info("replayed %d tokens on %s after waiting for KV blocks", len(ids), opened.generation.served_by)
        return replace(opened, offset=failed.offset)

    async def _when_room(self, target: Target, available: list[str], request: GenerationRequest, error: Busy,
                         resume: tuple[int, ...], exclude: set[str]) -> Served:
        """A stage answered Busy (its KV pool or session places are spent by other streams; it is
        healthy, so not blamed): wait per `kv_wait.decide`, then open a chain (the same one, or a
        replica) with `resume`, until one gets as far as a first token; raises the last Busy when
        waiting ran out, or at once when `kv_wait.MAX_WAITING` streams of the model wait already (each
        replay prefills again through the stages before the full one, so waiters are not free). Before
        a first token too, as a serving engine queues a request it has no room for instead of
        refusing it."""
        if self._waiting.get(target.digest, 0) >= kv_wait.MAX_WAITING:
            raise error
        self._waiting[target.digest] = self._waiting.get(target.digest, 0) + 1
        try:
            since, attempts = self.dispatch.now(), 0
            while True:
                step = kv_wait.decide(error.retry_after_s, since, self.dispatch.now(), attempts, draw=self._draw())
                if isinstance(step, kv_wait.GiveUp):
                    log.warning("no chain of %s had room for %.0f s: giving up", target.alias, step.waited_s)
                    raise error
                await asyncio.sleep(step.delay_s)
                attempts += 1
                try:
                    return await self._open_pipeline(self.view(), target, available, request, exclude, resume)
                except Refused:
                    raise Busy(1) from None
                except Busy as e:
                    error = e
        finally:
            if (left := self._waiting.get(target.digest, 0) - 1) > 0:
                self._waiting[target.digest] = left
            else:
                self._waiting.pop(target.digest, None)

    async def _whole(self, view: MeshView, target: Target, request: GenerationRequest,
                     attempts: Attempts) -> Served | None:
        """The best whole-model holder, opened under the retry policy; None when nobody holds it whole."""
        attempts = replace(attempts, tried=0, failed=[])  # a fresh try budget; the exclusions carry on
        served: list[str] = []

        async def on(advert: NodeAdvert) -> Generation:
            generation = await self.dispatch.open_generation(view, advert, target, request)
            served.append(advert.node_id)
            return generation

        generation = await self.dispatch.first_holder(view, target, prefix_key(request), attempts, on)
        return Served(generation, served[-1], request=request) if generation is not None else None

    async def _open(self, view: MeshView, target: Target, available: list[str], request: GenerationRequest,
                    attempts: Attempts, lookup_wait_s: float | None = None) -> Served:
        async def attempt(view: MeshView) -> Served:
            held = await self._whole(view, target, request, attempts)
            if held is not None:
                return held
            try:
                return await self._open_pipeline(view, target, available, request, attempts.exclude, ())
            except Refused:  # e.g. a stage without the pipeline service yet: the client may try again later
                raise Busy(1) from None
            except Busy as e:  # a stage's KV pool or session places are spent: room comes as streams end
                log.warning("a stage of %s has no room before the first token (waits, then retries): %s",
                            target.alias, e.message)
                return await self._when_room(target, available, request, e, (), attempts.exclude)

        return await self._or_looked_up(view, target.digest, attempts.exclude, attempt, lookup_wait_s)

    async def _open_pipeline(self, view: MeshView, target: Target, available: list[str],
                             request: GenerationRequest, exclude: set[str], resume: tuple[int, ...]) -> Served:
        """No node holds the model whole: drive the cheapest chain of layer ranges from its stage 0.
        A chain that fails before its first token is blamed, its failed stage excluded, and the next
        chain tried (at most MAX_CHAIN_TRIES); `resume` are ids already sent (a failed-over stream)."""
        failures: list[str] = []
        for _ in range(MAX_CHAIN_TRIES):
            view = self.view() if failures else view
            avoid = recently_failed(self.dispatch.failures, self.dispatch.now())
            holding = view.holding(target.digest)
            route = (replica_route(self.placer.replicas(target.digest), target.digest, holding,
                                   frozenset(exclude) | avoid, self.streams)
                     or replacement_route(target.digest, holding, frozenset(exclude), avoid, self.streams))
            if route is None:
                if failures:
                    break
                route = least_busy(await self.placer.place(target, view, available, frozenset(exclude)), self.streams)
            else:
                self.placer.forget(target.digest)
            chain = route.stages
            try:
                return await self._open_chain(view, target, request, chain, resume)
            except Unavailable as e:
                failure = blame(chain, e.message)
                failures.append(describe(failure, {a.node_id: a.name for a in view.adverts}))
                log.warning("%s before its first token", failures[-1])
                self.dispatch.record_failure(failure.stage.node)
                exclude.add(failure.stage.node)
        if not failures:
            raise Unavailable("no chain of layer ranges covers the model", code="pipeline_failed")
        raise Unavailable("; ".join(failures) + ("; no other chain" if len(failures) < MAX_CHAIN_TRIES else ""),
                          code="pipeline_failed")

    async def _open_chain(self, view: MeshView, target: Target, request: GenerationRequest,
                          chain: tuple[Stage, ...], resume: tuple[int, ...]) -> Served:
        adverts = [view.advert(s.node) for s in chain]
        if any(a is None for a in adverts):
            raise Unavailable("a node of the planned pipeline left the mesh", code="pipeline_failed")
        names = "+".join(a.name for a in adverts if a is not None)
        extra: dict[str, Any] = {"chain": encode_chain(list(chain))}
        if resume:
            extra["resume"] = list(resume)
        stream = self._counted(chain, remote_generate(self._channels, chain[0].node, target.digest, request,
                                                      method="PipelineGenerate", extra=extra))
        head = await first_chunk(stream)  # a Refused (e.g. a stage without the pipeline service yet) rises
        return Served(Generation(served_by=names, first=head, rest=stream, model=target.alias), None, chain,
                      request=request)

    async def _counted(self, chain: tuple[Stage, ...], stream: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        """`stream`, counted in `self.streams` on every node of its chain from its first read to its end."""
        for s in chain:
            self.streams[s.node] = self.streams.get(s.node, 0) + 1
        try:
            async for chunk in stream:
                yield chunk
        finally:
            for s in chain:
                if (left := self.streams.get(s.node, 0) - 1) > 0:
                    self.streams[s.node] = left
                else:
                    self.streams.pop(s.node, None)
            await aclose(stream)

    # --- embeddings ----------------------------------------------------------------------------------
    async def embed(self, model: str, texts: list[EmbedInput]) -> Embeddings:
        view, target, available = await self._find(model)
        return await self.dispatch.embed(view, target, texts, available)

    def describe_self(self) -> dict:
        return self._describe_self()
