"""Pipeline failover decisions (pure; clock passed in): which stage failed, and the chain that replaces it.

The gateway drives failover (issue 14): it already relays every chunk, so it keeps each sampled id,
and it is the one place that sees the whole chain and the PeerTable. When a pipeline fails, the error
stage 0 relays names the stage that failed ("next stage <id> <why>", passed on hop by hop by
`next_stage.py`); no name means stage 0 itself failed (it closed, went silent, or erred). The failed
stage is excluded and `route_pipeline` runs again over the remaining holders; nodes that failed
recently are avoided when a chain without them exists.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from discovery.advert import NodeAdvert
from placement.choose_holder import FailureRecord
from placement.cluster import Stage
from placement.route_pipeline import PipelineRoute, route_pipeline

MAX_CHAIN_TRIES = 3  # chains tried before a pipeline stream's first token (or its resumed first token)
AVOID_FAILED_S = 15.0  # a node that failed this recently is avoided when a chain without it exists
_NAMED = re.compile(r"next stage ([0-9a-f]{8}) (.*)")


@dataclass(frozen=True, slots=True)
class StageFailure:
    """Which stage of a chain failed, and why (as far as the error says)."""

    stage: Stage
    index: int
    why: str


def blame(chain: Sequence[Stage], message: str) -> StageFailure:
    """The stage an error from a chain's stage 0 names; stage 0 itself when it names none in the chain."""
    if (m := _NAMED.search(message)) is not None:
        for i, stage in enumerate(chain):
            if i > 0 and stage.node.startswith(m.group(1)):
                return StageFailure(stage, i, m.group(2))
    return StageFailure(chain[0], 0, message) if chain else StageFailure(Stage("", 0, 0), 0, message)


def recently_failed(failures: Mapping[str, FailureRecord], now: float, within_s: float = AVOID_FAILED_S) -> frozenset[str]:
    return frozenset(n for n, f in failures.items() if now - f.last_at < within_s)


def replacement_route(digest: str, adverts: Sequence[NodeAdvert], exclude: frozenset[str],
                      avoid: frozenset[str] = frozenset(), streams: Mapping[str, int] | None = None) -> PipelineRoute | None:
    """The cheapest chain without the excluded nodes, and without the avoided ones when one exists;
    `streams`: the gateway's own open streams per node (spreads a burst over replica chains)."""
    if avoid - exclude:
        route = route_pipeline(digest, adverts, exclude=exclude | avoid, streams=streams)
        if route is not None:
            return route
    return route_pipeline(digest, adverts, exclude=exclude, streams=streams)


def replica_route(replicas: Sequence[PipelineRoute], digest: str, adverts: Sequence[NodeAdvert],
                  skip: frozenset[str], streams: Mapping[str, int]) -> PipelineRoute | None:
    """Of the chains placed as replicas (--replicas), the least busy one whose every range is still
    advertised and none of whose nodes is in `skip` (failed or avoided); None when none is left.
    Whole replica chains, rather than the cheapest path over their ranges: a node that has not measured
    its speed yet would look slower than one that has, and a burst would all go to the measured chain."""
    held = {(a.node_id, m.start, m.end) for a in adverts for m in a.models if m.digest == digest}
    usable = [r for r in replicas
              if all(s.node not in skip and (s.node, s.start, s.end) in held for s in r.stages)]
    return least_busy(usable, streams) if usable else None


def least_busy(routes: Sequence[PipelineRoute], streams: Mapping[str, int]) -> PipelineRoute:
    """Of placed chains (replicas), the one whose busiest node has the fewest of our streams; the
    cheapest on a tie."""
    return min(routes, key=lambda r: (max((streams.get(s.node, 0) for s in r.stages), default=0), r.est_ms_per_token))


def describe(failure: StageFailure, names: Mapping[str, str]) -> str:
    s = failure.stage
    name = names.get(s.node, s.node[:8])
    return f"pipeline stage {failure.index} ({name}, layers [{s.start}, {s.end})) failed: {failure.why}"
