"""Placing an offered model: plan a split over the nodes offering its GGUF, have each load its range.

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
from placement.offer_plan import plan_offer
from placement.route_pipeline import PipelineRoute

log = logging.getLogger(__name__)
PLACED_TTL_S = 5.0  # adverts show loaded ranges within a second or two; below any --unload-idle-s


class Placer:
    def __init__(self, channels: PeerChannels, clock: Callable[[], float] = time.monotonic) -> None:
        self._channels = channels
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        self._placed: dict[str, tuple[PipelineRoute, float]] = {}  # until adverts show the loaded ranges

    def forget(self, digest: str) -> None:
        """Adverts now show the model's ranges: route over them."""
        self._placed.pop(digest, None)

    async def place(self, target: Target, view: MeshView, available: list[str],
                    exclude: frozenset[str] = frozenset()) -> PipelineRoute:
        """A chain over the offering nodes, none of them in `exclude` (nodes that just failed: a
        re-plan loads the missing ranges on the others)."""
        async with self._locks.setdefault(target.digest, asyncio.Lock()):
            if ((placed := self._placed.get(target.digest)) is not None and self._clock() - placed[1] < PLACED_TTL_S
                    and not any(s.node in exclude for s in placed[0].stages)):
                return placed[0]
            offering = [a for a in view.adverts if a.node_id not in exclude]
            try:
                plan = plan_offer(target.digest, offering)  # KV as the offering nodes reserve it
            except PlacementError as e:
                raise CannotPlace(f"cannot place {target.alias}: {e}", code="insufficient_memory") from None
            if plan is None:
                raise ModelNotFound(target.alias, available)
            name = {a.node_id: a.name for a in view.adverts}
            log.info("placing %s: %s", target.alias, ", ".join(f"{name[s.node]}[{s.start}:{s.end})" for s in plan.stages))
            try:
                await asyncio.gather(*(
                    remote_load_shard(self._channels, s.node, target.digest, s.start, s.end)
                    for s in plan.stages
                ))
            except MeshError as e:
                raise CannotPlace(f"loading {target.alias} failed: {e}", code="load_failed") from None
            route = PipelineRoute(tuple(plan.stages), plan.time_per_token_ms)
            self._placed[target.digest] = (route, self._clock())
            return route

