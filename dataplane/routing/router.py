"""MeshRouter: the gateway's backend on every node — serve here, or route to the best holder.

Each request takes one `MeshView` (our advert built once, one snapshot of the peers), resolves the
model in its catalog, then opens the best whole-model holder under the one retry policy
(`dispatch.py`, `retry.py`), else the cheapest chain of layer ranges (placing an offered model first,
`placing.py`). A holder that fails mid-stream is replaced (`resume.py`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

from core.errors import Busy, ModelNotFound, Refused, Unavailable
from core.serving import Embeddings, Generation, ModelListing, first_chunk
from core.types import GenerationRequest
from dataplane.calls import remote_generate
from dataplane.channels import Endpoint, PeerChannels
from dataplane.routing.dispatch import Dispatcher, prefix_key
from dataplane.routing.placing import Placer
from dataplane.routing.resume import Served, resuming
from dataplane.routing.retry import Attempts
from dataplane.routing.view import Catalog, MeshView, Target, catalog_key, list_models, resolve
from dataplane.stage_wire import encode_chain
from discovery.advert import NodeAdvert
from engine.local_models import LocalModels
from placement.route_pipeline import route_pipeline

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
    ) -> None:
        self.node_name = node_name
        self.local = local
        self._self_advert = self_advert
        self._peer_adverts = peer_adverts
        self._channels = channels
        self._describe_self = describe_self
        self.dispatch = Dispatcher(local, channels, clock)
        self.placer = Placer(channels)
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

    # --- generation ----------------------------------------------------------------------------------
    async def open_generation(self, model: str, request: GenerationRequest) -> Generation:
        view = self.view()
        target, available = self._resolve(view, model)
        attempts = Attempts()
        served = await self._open(view, target, available, request, attempts)
        latest = [served]

        async def reopen(resumed: GenerationRequest) -> Served:
            # A failed pipeline is not reopened over (likely) the same stages: only whole-model holders
            # may resume it, so a hung stage costs one detection, not one per retry.
            pipeline_ok = latest[-1].node_id is not None
            latest.append(await self._open(self.view(), target, available, resumed, attempts, pipeline_ok=pipeline_ok))
            return latest[-1]

        def on_failure(node_id: str) -> None:
            self.dispatch.record_failure(node_id)
            attempts.exclude.add(node_id)

        generation = served.generation
        generation.rest = resuming(served, request, reopen, on_failure)
        return generation

    async def _open(self, view: MeshView, target: Target, available: list[str], request: GenerationRequest,
                    attempts: Attempts, *, pipeline_ok: bool = True) -> Served:
        attempts = replace(attempts, tried=0, failed=[])  # a fresh try budget; the exclusions carry on
        served: list[str] = []

        async def on(advert: NodeAdvert) -> Generation:
            generation = await self.dispatch.open_generation(view, advert, target, request)
            served.append(advert.node_id)
            return generation

        generation = await self.dispatch.first_holder(view, target, prefix_key(request), attempts, on)
        if generation is not None:
            return Served(generation, served[-1])
        if not pipeline_ok:
            raise Unavailable("the pipeline failed and no whole-model holder can resume it", code="pipeline_failed")
        return Served(await self._open_pipeline(view, target, available, request), None)

    async def _open_pipeline(self, view: MeshView, target: Target, available: list[str],
                             request: GenerationRequest) -> Generation:
        """No node holds the model whole: drive the cheapest chain of layer ranges from its stage 0."""
        route = route_pipeline(target.digest, view.holding(target.digest))
        if route is None:
            route = await self.placer.place(target, view, available)
        else:
            self.placer.forget(target.digest)
        adverts = [view.advert(s.node) for s in route.stages]
        if any(a is None for a in adverts):
            raise Unavailable("a node of the planned pipeline left the mesh", code="pipeline_failed")
        chain = list(route.stages)
        names = "+".join(a.name for a in adverts if a is not None)
        assert adverts[0] is not None
        stream = remote_generate(self._channels, adverts[0].node_id, target.digest, request,
                                 method="PipelineGenerate", extra={"chain": encode_chain(chain)})
        try:
            head = await first_chunk(stream)
        except Unavailable as e:
            raise Unavailable(f"pipeline {names} failed: {e}", code="pipeline_failed") from None
        except Refused:  # e.g. a stage without the pipeline service yet: try again later
            raise Busy(1) from None
        return Generation(served_by=names, first=head, rest=stream, model=target.alias)

    # --- embeddings ----------------------------------------------------------------------------------
    async def embed(self, model: str, texts: list[str]) -> Embeddings:
        view = self.view()
        target, available = self._resolve(view, model)
        return await self.dispatch.embed(view, target, texts, available)

    def describe_self(self) -> dict:
        return self._describe_self()
