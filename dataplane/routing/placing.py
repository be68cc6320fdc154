"""Placing an offered model: plan a split over the nodes offering its GGUF, have each load its range.

With `replicas` N > 1 (--replicas), N disjoint chains are planned when memory allows
(`placement/replicas.py`) and all of them loaded: requests spread over them, and a failed node's
streams move to another chain with no re-plan (the router routes over the loaded ranges).

One placement per model at a time; later requests reuse its route until adverts show the ranges, for
at most PLACED_TTL_S: offering nodes unload idle ranges (--unload-idle-s, at least 10 s), so an older
placement may name ranges that are gone; placing again is cheap (LoadShard of a held range is a no-op).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from core.errors import CannotPlace, MeshError, ModelNotFound
from dataplane.calls import remote_load_shard
from dataplane.channels import PeerChannels
from dataplane.routing.view import MeshView, Target
from placement.cluster import PlacementError
from placement.replicas import plan_replicas
from placement.route_pipeline import PipelineRoute

log = logging.getLogger(__name__)
PLACED_TTL_S = 5.0  # adverts show loaded ranges within a second or two; below any --unload-idle-s


class Placer:
    def __init__(self, channels: PeerChannels, clock: Callable[[], float] = time.monotonic, replicas: int = 1) -> None:
        self._channels = channels
        self._clock = clock
        self._n_replicas = replicas
        self._locks: dict[str, asyncio.Lock] = {}
        # until adverts show the loaded ranges: the chains placed (one per replica) and when
        self._placed: dict[str, tuple[tuple[PipelineRoute, ...], float]] = {}
        self._replicas: dict[str, tuple[PipelineRoute, ...]] = {}  # the last placement's chains, when several

    def replicas(self, digest: str) -> tuple[PipelineRoute, ...]:
        """The chains the last placement of `digest` loaded, when it loaded several (--replicas)."""
        return self._replicas.get(digest, ())

    def forget(self, digest: str) -> None:
        """Adverts now show the model's ranges: route over them."""
        self._placed.pop(digest, None)

    async def place(self, target: Target, view: MeshView, available: list[str],
                    exclude: frozenset[str] = frozenset()) -> tuple[PipelineRoute, ...]:
        """The chains (one per replica that fits) over the offering nodes, none of them in `exclude`
        (nodes that just failed: a chain of a recent placement without them is reused, else a re-plan
        loads the missing ranges on the others)."""
        async with self._locks.setdefault(target.digest, asyncio.Lock()):
            if (placed := self._placed.get(target.digest)) is not None and self._clock() - placed[1] < PLACED_TTL_S:
                usable = tuple(r for r in placed[0] if not any(s.node in exclude for s in r.stages))
                if usable:
                    return usable
            offering = [a for a in view.adverts if a.node_id not in exclude]
            try:
                plans = plan_replicas(target.digest, offering, self._n_replicas)  # KV as the offering nodes reserve it
            except PlacementError as e:
                raise CannotPlace(f"cannot place {target.alias}: {e}", code="insufficient_memory") from None
            if not plans:
                raise ModelNotFound(target.alias, available)
            name = {a.node_id: a.name for a in view.adverts}
            for plan in plans:
                log.info("placing %s: %s", target.alias,
                         ", ".join(f"{name[s.node]}[{s.start}:{s.end})" for s in plan.stages))
            try:
                await asyncio.gather(*(
                    remote_load_shard(self._channels, s.node, target.digest, s.start, s.end)
                    for plan in plans for s in plan.stages
                ))
            except MeshError as e:
                raise CannotPlace(f"loading {target.alias} failed: {e}", code="load_failed") from None
            routes = tuple(PipelineRoute(tuple(p.stages), p.time_per_token_ms) for p in plans)
            self._placed[target.digest] = (routes, self._clock())
            if len(routes) > 1:
                self._replicas[target.digest] = routes
            else:
                self._replicas.pop(target.digest, None)
            return routes

