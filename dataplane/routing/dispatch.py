"""Ranking and dispatch: open a generation or an embedding on the best whole-model holder, under the
one retry policy (`retry.py`), on this node's engine or a peer's over gRPC."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from core.errors import MeshError, ModelNotFound, Unavailable
from core.serving import Embeddings, Generation, aclose, first_chunk
from core.types import Chunk, EmbedInput, GenerationRequest, SamplingParams
from dataplane.calls import remote_embed, remote_generate
from dataplane.channels import PeerChannels
from dataplane.local import embed_local, open_local_generation
from dataplane.routing.retry import Attempts, GiveUp, NoHolder, after_error, next_try, record_failure
from dataplane.routing.view import MeshView, Target
from discovery.advert import NodeAdvert
from engine.local_models import LocalModels
from placement.choose_holder import FailureRecord, holds_whole, rank_holders

log = logging.getLogger(__name__)
T = TypeVar("T")


def prefix_key(request: GenerationRequest) -> str:
    """Identifies a conversation: its first two messages (system + first user turn) stay put across turns."""
    if request.messages is not None:
        head = json.dumps(request.messages[:2], sort_keys=True)
    else:
        head = request.prompt[:512] if request.prompt is not None else str(list(request.prompt_ids or ())[:128])
    return hashlib.blake2b(head.encode(), digest_size=8).hexdigest()


class Dispatcher:
    def __init__(self, local: LocalModels, channels: PeerChannels, clock: Callable[[], float] = time.time) -> None:
        self.local = local
        self._channels = channels
        self._clock = clock
        self.failures: dict[str, FailureRecord] = {}  # by node id
        self.inflight: dict[str, int] = {}  # by node id: this gateway's own requests there

    def now(self) -> float:
        return self._clock()

    def record_failure(self, node_id: str) -> None:
        self.failures[node_id] = record_failure(self.failures.get(node_id), self._clock())

    async def first_holder(
        self, view: MeshView, target: Target, key: str, attempts: Attempts,
        open_on: Callable[[NodeAdvert], Awaitable[T]],
    ) -> T | None:
        """`open_on` on the best holder, retried per the policy; None when nobody holds it whole."""
        while True:
            ranking = rank_holders(target.digest, view.holding(target.digest), view.me, self._clock(), self.failures,
                                   inflight=self.inflight, prefix_key=key)
            if ranking.saturated and (held := self.local.resolve(target.digest)) is not None:
                # full here too: say when our own queue is likely to have room, not a flat 1 s
                attempts.retry_after_s = max(attempts.retry_after_s, held.runner.current_retry_after_s())
            decision = next_try(ranking.ranked, bool(ranking.saturated), attempts)
            if isinstance(decision, NoHolder):
                return None
            if isinstance(decision, GiveUp):
                raise decision.error
            advert = view.advert(decision.node_id)
            try:
                if advert is None or not holds_whole(advert, target.digest):
                    raise Unavailable(f"{decision.node_id[:8]} is gone")
                return await open_on(advert)
            except MeshError as e:
                if after_error(attempts, decision.node_id, e):
                    log.warning("holder %s failed before the first token: %s", decision.node_id[:8], e)
                    self.record_failure(decision.node_id)

    # --- generation ----------------------------------------------------------------------------------
    async def open_generation(self, view: MeshView, advert: NodeAdvert, target: Target,
                              request: GenerationRequest) -> Generation:
        if advert.node_id == view.me.node_id:
            local = self.local.resolve(target.digest)
            if local is None:
                raise Unavailable("model no longer held here")
            return await open_local_generation(advert.name, local, request)
        if not advert.addresses.grpc:
            raise Unavailable(f"{advert.node_id[:8]} has no data-plane address")
        stream = self._tracked(advert.node_id,
                               remote_generate(self._channels, advert.node_id, target.digest, request))
        first = await first_chunk(stream)
        return Generation(served_by=advert.name, first=first, rest=stream, model=target.alias)

    async def _tracked(self, node_id: str, stream: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        self.inflight[node_id] = self.inflight.get(node_id, 0) + 1
        try:
            async for chunk in stream:
                yield chunk
        finally:
            self.inflight[node_id] -= 1
            await aclose(stream)

    # --- embeddings ----------------------------------------------------------------------------------
    async def embed(self, view: MeshView, target: Target, texts: list[EmbedInput], available: list[str]) -> Embeddings:
        first = texts[0]
        probe = GenerationRequest("embed", SamplingParams(), prompt=first[:512] if isinstance(first, str) else str(first[:128]))

        async def on(advert: NodeAdvert) -> Embeddings:
            if advert.node_id == view.me.node_id:
                local = self.local.resolve(target.digest)
                if local is None:
                    raise Unavailable("model no longer held here")
                return await embed_local(advert.name, local, texts)
            vectors, tokens = await remote_embed(self._channels, advert.node_id, target.digest, texts)
            return Embeddings(advert.name, vectors, tokens)

        result = await self.first_holder(view, target, prefix_key(probe), Attempts(), on)
        if result is None:
            raise ModelNotFound(target.alias, available)
        return result

