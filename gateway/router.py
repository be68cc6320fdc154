"""MeshRouter: the gateway's backend on every node — serve here, or route to the best holder.

Before the first token a failing holder is retried on the next one transparently. A holder that
fails mid-stream is replaced by another that continues from the text so far (prompt + continuation,
max_tokens reduced by what was already sent), so the client sees one answer with no duplicated text;
when none is left the stream ends with an error event.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from discovery.advert import NodeAdvert
from engine.local_models import LocalModels
from engine.types import Chunk, FinishReason, GenerationRequest, SamplingParams, Usage
from gateway.backend import Embeddings, Generation, ModelListing, first_chunk
from gateway.errors import ApiError, bad_request, model_not_found, overloaded
from gateway.local import embed_local, open_local_generation
from gateway.remote import (
    HolderFailed,
    HolderRefused,
    PeerChannels,
    remote_embed,
    remote_generate,
    remote_load_shard,
)
from placement.choose_holder import FailureRecord, holds_whole, rank_holders
from placement.cluster import PlacementError
from placement.offer_plan import plan_offer
from placement.route_pipeline import PipelineRoute, PipelineStage, route_pipeline

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3
OFFER_CONTEXT_TOKENS = 2048 * 8  # the torch engine's KV cache: 8 sessions of 2048 tokens
FAILURE_MEMORY_S = 120.0


@dataclass(frozen=True, slots=True)
class _Target:
    digest: str
    alias: str
    context_length: int


def prefix_key(request: GenerationRequest) -> str:
    """Identifies a conversation: its first two messages (system + first user turn) stay put across turns."""
    if request.messages is not None:
        head = json.dumps(request.messages[:2], sort_keys=True)
    else:
        head = (request.prompt or "")[:512]
    return hashlib.blake2b(head.encode(), digest_size=8).hexdigest()


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
    ) -> None:
        self.local = local
        self._self_advert = self_advert
        self._peer_adverts = peer_adverts
        self._channels = channels
        self._describe_self = describe_self
        self._clock = clock
        self._failures: dict[str, FailureRecord] = {}
        self._inflight: dict[str, int] = {}
        self._placing: dict[str, asyncio.Lock] = {}
        self._placed: dict[str, PipelineRoute] = {}  # until adverts show the loaded ranges
        self.node_name = node_name

    # --- what the mesh holds -------------------------------------------------------------------------
    def _all_adverts(self) -> list[NodeAdvert]:
        return [self._self_advert(), *self._peer_adverts()]

    def list_models(self) -> list[ModelListing]:
        """Models held whole somewhere, and models whose layer ranges chain into a full pipeline."""
        adverts = self._all_adverts()
        by_digest: dict[str, tuple[_Target, int, list[str]]] = {}
        for advert in adverts:
            for m in advert.models:
                _, _, whole = by_digest.setdefault(m.digest, (_Target(m.digest, m.alias, m.ctx), m.n_layers, []))
                if m.whole:
                    whole.append(advert.name)
        listings = []
        for target, n_layers, whole in sorted(by_digest.values(), key=lambda v: v[0].alias):
            if whole:
                listings.append(ModelListing(target.alias, target.digest, n_layers, target.context_length, tuple(whole)))
            elif (route := route_pipeline(target.digest, adverts)) is not None:
                names = {a.node_id: a.name for a in adverts}
                chain = tuple(names[s.node_id] for s in route.stages)
                listings.append(ModelListing(target.alias, target.digest, n_layers, target.context_length, chain))
        offered: dict[str, tuple[str, int, int]] = {}
        for advert in adverts:
            for f in advert.files:
                if f.digest not in by_digest:
                    offered.setdefault(f.digest, (f.alias, f.n_layers, f.ctx))
        for digest, (alias, n_layers, ctx) in sorted(offered.items(), key=lambda kv: kv[1][0]):
            listings.append(ModelListing(alias, digest, n_layers, ctx, ()))  # loaded on first request
        return listings

    def _resolve(self, name: str) -> _Target:
        for listing in self.list_models():
            if name in (listing.alias, listing.digest) or (len(name) >= 12 and listing.digest.startswith(name)):
                return _Target(listing.digest, listing.alias, listing.context_length)
        raise model_not_found(name, sorted({m.alias for m in self.list_models()}))

    def _record_failure(self, node_id: str) -> None:
        now = self._clock()
        old = self._failures.get(node_id)
        count = old.count + 1 if old is not None and now - old.last_at < FAILURE_MEMORY_S else 1
        self._failures[node_id] = FailureRecord(count, now)

    def _ranked(self, target: _Target, request: GenerationRequest, exclude: set[str]) -> tuple[list[str], bool]:
        ranking = rank_holders(
            target.digest,
            self._peer_adverts(),
            self._self_advert(),
            self._clock(),
            self._failures,
            inflight=self._inflight,
            prefix_key=prefix_key(request),
        )
        return [n for n in ranking.ranked if n not in exclude], bool(ranking.saturated)

    def _advert(self, node_id: str) -> NodeAdvert | None:
        return next((a for a in self._all_adverts() if a.node_id == node_id), None)

    # --- generation ----------------------------------------------------------------------------------
    async def _open_on(self, node_id: str, target: _Target, request: GenerationRequest) -> Generation:
        me = self._self_advert()
        if node_id == me.node_id:
            local = self.local.resolve(target.digest)
            if local is None:
                raise HolderFailed("model no longer held here")
            return await open_local_generation(me.name, local, request)
        advert = self._advert(node_id)
        if advert is None or not advert.addresses.grpc or not holds_whole(advert, target.digest):
            raise HolderFailed(f"{node_id[:8]} is gone")
        stream = self._tracked(node_id, remote_generate(self._channels, advert.addresses.grpc, target.digest, request))
        first = await first_chunk(stream)
        return Generation(served_by=advert.name, first=first, rest=stream, model=target.alias)

    async def _tracked(self, node_id: str, stream: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        self._inflight[node_id] = self._inflight.get(node_id, 0) + 1
        try:
            async for chunk in stream:
                yield chunk
        finally:
            self._inflight[node_id] -= 1
            await stream.aclose()  # type: ignore[attr-defined]

    async def _open_first(self, target: _Target, request: GenerationRequest, exclude: set[str]) -> Generation:
        retry_after = 1
        attempts = 0
        failed: list[str] = []
        while attempts < MAX_ATTEMPTS:
            ranked, saturated = self._ranked(target, request, exclude)
            if not ranked and not saturated and not attempts:
                return await self._open_pipeline(target, request)
            if not ranked:
                break
            node_id = ranked[0]
            attempts += 1
            try:
                return await self._open_on(node_id, target, request)
            except HolderFailed as e:
                log.warning("holder %s failed before the first token: %s", node_id[:8], e)
                self._record_failure(node_id)
                failed.append(f"{node_id[:8]}: {e}")
            except HolderRefused as e:
                if e.code.name == "INVALID_ARGUMENT":
                    raise bad_request(str(e)) from None
                retry_after = e.retry_after_s
            except ApiError as e:
                if e.status != 429:
                    raise
            exclude.add(node_id)
        if failed and len(failed) == attempts:
            raise ApiError(502, "every holder tried failed: " + "; ".join(failed), type="server_error",
                           code="holder_failed")
        raise overloaded(retry_after)

    async def _open_pipeline(self, target: _Target, request: GenerationRequest) -> Generation:
        """No node holds the model whole: drive the cheapest chain of layer ranges from its stage 0."""
        adverts = {a.node_id: a for a in self._all_adverts()}
        route = route_pipeline(target.digest, list(adverts.values()))
        if route is None:
            route = await self._place(target, adverts)
        else:
            self._placed.pop(target.digest, None)
        chain = [[adverts[s.node_id].addresses.grpc, s.start, s.end] for s in route.stages]
        first = adverts[route.stages[0].node_id]
        names = "+".join(adverts[s.node_id].name for s in route.stages)
        stream = remote_generate(
            self._channels, first.addresses.grpc, target.digest, request, method="PipelineGenerate", extra={"chain": chain}
        )
        try:
            head = await first_chunk(stream)
        except HolderRefused as e:
            if e.code.name == "INVALID_ARGUMENT":
                raise bad_request(str(e), code="context_length_exceeded") from None
            raise overloaded(e.retry_after_s) from None
        except HolderFailed as e:
            raise ApiError(502, f"pipeline {names} failed: {e}", type="server_error", code="pipeline_failed") from None
        return Generation(served_by=names, first=head, rest=stream, model=target.alias)

    async def _place(self, target: _Target, adverts: dict[str, NodeAdvert]) -> PipelineRoute:
        """Nobody serves the model: plan a split over the nodes offering its GGUF and have them load it."""
        lock = self._placing.setdefault(target.digest, asyncio.Lock())
        async with lock:  # one placement per model at a time; later requests reuse its result
            if (route := self._placed.get(target.digest)) is not None:
                return route
            try:
                plan = plan_offer(target.digest, list(adverts.values()), context_tokens=OFFER_CONTEXT_TOKENS)
            except PlacementError as e:
                raise ApiError(503, f"cannot place {target.alias}: {e}", type="server_error",
                               code="insufficient_memory") from None
            if plan is None:
                raise model_not_found(target.alias, sorted({m.alias for m in self.list_models()}))
            log.info("placing %s: %s", target.alias,
                     ", ".join(f"{adverts[s.node].name}[{s.start}:{s.end})" for s in plan.stages))
            try:
                await asyncio.gather(*(
                    remote_load_shard(self._channels, adverts[s.node].addresses.grpc, target.digest, s.start, s.end)
                    for s in plan.stages
                ))
            except (HolderFailed, HolderRefused) as e:
                raise ApiError(503, f"loading {target.alias} failed: {e}", type="server_error",
                               code="load_failed") from None
            route = PipelineRoute(tuple(PipelineStage(s.node, s.start, s.end) for s in plan.stages), plan.time_per_token_ms)
            self._placed[target.digest] = route
            return route

    async def open_generation(self, model: str, request: GenerationRequest) -> Generation:
        target = self._resolve(model)
        exclude: set[str] = set()
        generation = await self._open_first(target, request, exclude)
        generation.rest = self._resuming(generation.first, generation.rest, generation.served_by, target, request, exclude)
        return generation

    async def _resuming(
        self,
        first: Chunk,
        stream: AsyncIterator[Chunk],
        served_by: str,
        target: _Target,
        request: GenerationRequest,
        exclude: set[str],
    ) -> AsyncIterator[Chunk]:
        text = first.text
        n_tokens = len(first.token_ids)
        try:
            while True:
                try:
                    async for chunk in stream:
                        text += chunk.text
                        n_tokens += len(chunk.token_ids)
                        if chunk.usage is not None:
                            chunk.usage = Usage(max(0, chunk.usage.prompt_tokens), n_tokens)
                        yield chunk
                    return
                except HolderFailed as e:
                    log.warning("holder %s failed mid-stream after %d tokens: %s", served_by, n_tokens, e)
                    failed = next((a.node_id for a in self._all_adverts() if a.name == served_by), None)
                    if failed is not None:
                        self._record_failure(failed)
                        exclude.add(failed)
                await _close(stream)
                params = request.params
                if params.max_tokens is not None and n_tokens >= params.max_tokens:
                    yield Chunk(finish_reason=FinishReason.LENGTH, usage=Usage(0, n_tokens))
                    return
                resumed = replace(
                    request,
                    continuation=request.continuation + text,
                    params=replace(params, max_tokens=params.max_tokens - n_tokens if params.max_tokens else None),
                )
                try:
                    next_generation = await self._open_first(target, resumed, exclude)
                except ApiError:
                    raise ApiError(
                        502, f"the holder serving this stream ({served_by}) failed and no other holder could resume it",
                        type="server_error", code="holder_failed",
                    ) from None
                served_by = next_generation.served_by
                log.info("resumed on %s after %d tokens", served_by, n_tokens)
                first = next_generation.first
                text += first.text
                n_tokens += len(first.token_ids)
                yield first
                stream = next_generation.rest
        finally:
            await _close(stream)

    # --- embeddings ----------------------------------------------------------------------------------
    async def embed(self, model: str, texts: list[str]) -> Embeddings:
        target = self._resolve(model)
        probe = GenerationRequest("embed", SamplingParams(), prompt=texts[0][:512])
        exclude: set[str] = set()
        for _ in range(MAX_ATTEMPTS):
            ranked, saturated = self._ranked(target, probe, exclude)
            if not ranked:
                raise overloaded(1) if saturated else model_not_found(model, [m.alias for m in self.list_models()])
            node_id = ranked[0]
            me = self._self_advert()
            try:
                if node_id == me.node_id:
                    local = self.local.resolve(target.digest)
                    if local is not None:
                        return await embed_local(me.name, local, texts)
                advert = self._advert(node_id)
                if advert is not None and advert.addresses.grpc:
                    vectors, tokens = await remote_embed(self._channels, advert.addresses.grpc, target.digest, texts)
                    return Embeddings(advert.name, vectors, tokens)
            except HolderFailed:
                self._record_failure(node_id)
            except HolderRefused as e:
                if e.code.name == "INVALID_ARGUMENT":
                    raise bad_request(str(e)) from None
            exclude.add(node_id)
        raise overloaded(1)

    def describe_self(self) -> dict:
        return self._describe_self()


async def _close(stream: AsyncIterator[Chunk]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
