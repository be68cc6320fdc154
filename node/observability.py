"""What a node shows of itself: the per-node Prometheus registry (gateway requests, engine queues,
pipeline stage steps, discovery), /metrics and /mesh/stats, and the dashboard at /."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram

from gateway.dashboard import add_dashboard_routes
from gateway.metrics import GatewayMetrics
from gateway.metrics_routes import add_metrics_routes
from node.metrics_collector import NodeCollector

if TYPE_CHECKING:
    from node.daemon import Node

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Observability:
    """One per node; a registry of its own, so several nodes can share a process (tests)."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self.enabled = node.config.metrics
        self.registry = CollectorRegistry()
        self.stage_step = Histogram("meshllm_pipeline_step_seconds",
                                    "Compute time of one pipeline stage step on this node (prefill or decode).",
                                    ["model", "layers", "phase"], buckets=STEP_BUCKETS, registry=self.registry)
        self.registry.register(node.models.queue_wait)
        self.registry.register(NodeCollector(node))
        self.gateway = GatewayMetrics(self.registry, node.name)

    def on_stage_step(self, digest: str, n_positions: int, compute_s: float) -> None:
        local = self._node.local.resolve(digest)
        if local is None or compute_s < 0:
            return
        phase = "decode" if n_positions == 1 else "prefill"
        self.stage_step.labels(local.model.alias, f"{local.shard.start}-{local.shard.end}", phase).observe(compute_s)

    def attach(self, app: web.Application) -> None:
        """Routes on the node's API app: /metrics and /mesh/stats (unless --no-metrics), and /."""
        if self.enabled:
            add_metrics_routes(app, self.gateway)
        add_dashboard_routes(app)
