"""GET /metrics (Prometheus text format) and GET /mesh/stats (the dashboard's live figures, JSON).

Both are behind the node's API keys when it has any (`gateway/app.py`: `KEYED_PATHS`): they describe
what API clients asked for. A scrape is not counted against a key's rate limit.
"""

from __future__ import annotations

import time

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from gateway.metrics import METRICS_KEY, GatewayMetrics, summary


async def metrics(request: web.Request) -> web.StreamResponse:
    m = request.app[METRICS_KEY]
    # OpenMetrics when the scraper asks for it, else the classic text format
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encode(m.registry)
    return web.Response(body=body, headers={"Content-Type": content_type})


async def stats(request: web.Request) -> web.StreamResponse:
    return web.json_response(summary(request.app[METRICS_KEY], time.time()))


def add_metrics_routes(app: web.Application, gateway_metrics: GatewayMetrics) -> None:
    """Serves /metrics and /mesh/stats, and makes the gateway track every generation request."""
    app[METRICS_KEY] = gateway_metrics
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/mesh/stats", stats)
