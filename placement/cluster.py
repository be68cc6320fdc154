"""Plain data the planner reasons over: a model, nodes, links, and the plan it returns.

Everything is a frozen dataclass validated at construction, so the planner itself never has to
re-check its input and the simulator, the CLI and the node daemon all hand it the same shapes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field


class PlacementError(ValueError):
    """The model cannot be placed on the cluster; the message says by how much it misses."""

    def __init__(self, message: str, *, shortfall_bytes: int = 0) -> None:
        super().__init__(message)
        self.shortfall_bytes = shortfall_bytes


def _positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _non_negative(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Byte sizes of one model; `activation_bytes_per_token` is what a hop carries (hidden x dtype)."""

    n_layers: int
    layer_bytes: int
    embed_bytes: int = 0
    head_bytes: int = 0
    kv_bytes_per_token_per_layer: int = 0
    activation_bytes_per_token: int = 0

    def __post_init__(self) -> None:
        _positive_int("n_layers", self.n_layers)
        _positive_int("layer_bytes", self.layer_bytes)
        for name in ("embed_bytes", "head_bytes", "kv_bytes_per_token_per_layer", "activation_bytes_per_token"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One node as the planner sees it.

    `memory_bytes` is what the node can give this model now (free memory). `total_memory_bytes`
    exists only for the exo baseline, which splits by total memory; it defaults to `memory_bytes`.
    `site` groups nodes for site-level links (see `Links.sites`), so a 1000-node campus does not
    need a million pair entries.
    """

    id: str
    memory_bytes: int
    layer_time_ms: float
    overhead_ms: float = 0.0
    total_memory_bytes: int = 0
    site: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"node id must be a non-empty str, got {self.id!r}")
        if not isinstance(self.memory_bytes, int) or isinstance(self.memory_bytes, bool) or self.memory_bytes < 0:
            raise ValueError(f"memory_bytes of {self.id} must be an int >= 0, got {self.memory_bytes!r}")
        _non_negative(f"layer_time_ms of {self.id}", self.layer_time_ms)
        if self.layer_time_ms <= 0:
            raise ValueError(f"layer_time_ms of {self.id} must be > 0")
        _non_negative(f"overhead_ms of {self.id}", self.overhead_ms)
        if not isinstance(self.total_memory_bytes, int) or self.total_memory_bytes < 0:
            raise ValueError(f"total_memory_bytes of {self.id} must be an int >= 0")
        if self.total_memory_bytes == 0:
            object.__setattr__(self, "total_memory_bytes", self.memory_bytes)
        if not isinstance(self.site, str):
            raise ValueError(f"site of {self.id} must be a str")


@dataclass(frozen=True, slots=True)
class Link:
    latency_ms: float
    bandwidth_bytes_per_s: float

    def __post_init__(self) -> None:
        _non_negative("latency_ms", self.latency_ms)
        _non_negative("bandwidth_bytes_per_s", self.bandwidth_bytes_per_s)
        if self.bandwidth_bytes_per_s <= 0:
            raise ValueError("bandwidth_bytes_per_s must be > 0")

    def hop_ms(self, n_bytes: int) -> float:
        return self.latency_ms + n_bytes * 1000.0 / self.bandwidth_bytes_per_s


def _key(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


@dataclass(frozen=True, slots=True)
class Links:
    """Symmetric links: a node pair entry wins over a site pair entry, which wins over `default`."""

    default: Link = field(default_factory=lambda: Link(0.5, 125_000_000.0))
    pairs: Mapping[tuple[str, str], Link] = field(default_factory=dict)
    sites: Mapping[tuple[str, str], Link] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Normalise keys once so lookups need no ordering logic in the planner's hot loop.
        object.__setattr__(self, "pairs", {_key(*k): v for k, v in self.pairs.items()})
        object.__setattr__(self, "sites", {_key(*k): v for k, v in self.sites.items()})

    def link(self, a: NodeSpec, b: NodeSpec) -> Link:
        found = self.pairs.get(_key(a.id, b.id)) if self.pairs else None
        if found is None and self.sites:
            found = self.sites.get(_key(a.site, b.site))
        return found if found is not None else self.default


@dataclass(frozen=True, slots=True)
class Cluster:
    model: ModelSpec
    nodes: tuple[NodeSpec, ...]
    links: Links = field(default_factory=Links)
    context_tokens: int = 4096
    concurrency: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelSpec):
            raise ValueError("model must be a ModelSpec")
        object.__setattr__(self, "nodes", tuple(self.nodes))
        if not self.nodes:
            raise ValueError("a cluster needs at least one node")
        ids = [n.id for n in self.nodes]
        if len(set(ids)) != len(ids):
            raise ValueError("node ids must be unique")
        _positive_int("context_tokens", self.context_tokens)
        _positive_int("concurrency", self.concurrency)

    @property
    def per_layer_bytes(self) -> int:
        """Weights plus the KV cache one layer needs for every concurrent sequence."""
        m = self.model
        return m.layer_bytes + m.kv_bytes_per_token_per_layer * self.context_tokens * self.concurrency

    def node(self, node_id: str) -> NodeSpec:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    def hop_ms(self, a: NodeSpec, b: NodeSpec) -> float:
        return self.links.link(a, b).hop_ms(self.model.activation_bytes_per_token)


@dataclass(frozen=True, slots=True)
class Stage:
    """Layers [start, end) on `node`, in chain order."""

    node: str
    start: int
    end: int

    def __post_init__(self) -> None:
        if not isinstance(self.start, int) or not isinstance(self.end, int) or not 0 <= self.start < self.end:
            raise ValueError(f"stage range must satisfy 0 <= start < end, got [{self.start}, {self.end})")

    @property
    def n_layers(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Plan:
    """A chain of stages covering [0, n_layers) contiguously.

    `objective_ms` is what the planner minimised: time per token when concurrency is 1, otherwise
    the slowest stage's time (compute plus outgoing hop), which sets the pipeline's pace.
    """

    stages: tuple[Stage, ...]
    time_per_token_ms: float
    bottleneck_ms: float
    concurrency: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages:
            raise ValueError("a plan needs at least one stage")
        if self.stages[0].start != 0:
            raise ValueError("the first stage must start at layer 0")
        for prev, nxt in zip(self.stages, self.stages[1:], strict=False):
            if prev.end != nxt.start:
                raise ValueError("stages must be contiguous")
        if len({s.node for s in self.stages}) != len(self.stages):
            raise ValueError("a node may hold only one stage")

    @property
    def objective_ms(self) -> float:
        return self.time_per_token_ms if self.concurrency == 1 else self.bottleneck_ms

    @property
    def tokens_per_s(self) -> float:
        """Decode rate with `concurrency` streams in flight: each stream waits a full round trip per
        token, and each stage works on one token at a time (no batching in this model)."""
        return min(self.concurrency * 1000.0 / self.time_per_token_ms, 1000.0 / self.bottleneck_ms)

    def owners(self) -> list[str]:
        """Node id per layer, for counting moved layers."""
        return [s.node for s in self.stages for _ in range(s.start, s.end)]

    def to_json(self) -> dict[str, list[dict[str, object]]]:
        return {"stages": [{"node": s.node, "start": s.start, "end": s.end} for s in self.stages]}
