"""What the gateway measures about the requests it serves: Prometheus instruments in a per-node registry
(several nodes can share a process in tests), and a short window of recent requests for the dashboard.

One `RequestTrack` per generation request; the gateway calls it at three points (opened, each chunk,
finished), so the relay loop pays one clock read and one histogram observation per chunk.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram

from core.types import Chunk, Usage

request_log = logging.getLogger("meshllm.request")

# Model labels come from what the mesh serves, never from the client's text: a client naming a million
# models must not make a million series. Past this many, the label is "other".
MAX_MODEL_LABELS = 64
OTHER = "other"
RECENT_REQUESTS = 64  # the dashboard's live tok/s and TTFT are over this many recent requests

# Latency buckets (seconds): TTFT spans a cached prefix on a GPU (ms) to a long CPU prefill (tens of s)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# per-token gaps: a fast GPU decode (ms) to a slow CPU pipeline (hundreds of ms)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True, slots=True)
class Finished:
    """One finished request, as the dashboard's window keeps it."""

    model: str
    route: str
    at_s: float  # wall clock
    ttft_s: float
    decode_tok_s: float  # generated tokens after the first, per second after the first
    completion_tokens: int


class GatewayMetrics:
    """The gateway's instruments; `registry` is the node's, where the node's collectors live too."""

    def __init__(self, registry: CollectorRegistry, node_name: str) -> None:
        self.registry = registry
        self.node_name = node_name
        self.requests = Counter("meshllm_requests", "Generation requests by model, route kind and final status.",
                                ["model", "route", "status"], registry=registry)
        self.prompt_tokens = Counter("meshllm_prompt_tokens", "Prompt tokens of finished requests.",
                                     ["model"], registry=registry)
        self.generated_tokens = Counter("meshllm_generated_tokens", "Tokens generated for clients.",
                                        ["model"], registry=registry)
        self.ttft = Histogram("meshllm_time_to_first_token_seconds",
                              "From the request's arrival to its first generated chunk.",
                              ["model", "route"], buckets=TTFT_BUCKETS, registry=registry)
        self.itl = Histogram("meshllm_inter_token_latency_seconds",
                             "Gap between generated tokens as the gateway relays them.",
                             ["model", "route"], buckets=ITL_BUCKETS, registry=registry)
        self._models: set[str] = set()
        self.recent: deque[Finished] = deque(maxlen=RECENT_REQUESTS)

    def model_label(self, model: str, known: Iterable[str] = ()) -> str:
        """`model` when the mesh serves it (an alias the router resolved), else OTHER; capped."""
        if model in self._models:
            return model
        if model and model in known and len(self._models) < MAX_MODEL_LABELS:
            self._models.add(model)
            return model
        return OTHER

    def track(self, request_id: str) -> RequestTrack:
        return RequestTrack(self, request_id)


def route_kind(served_by: str, node_name: str) -> str:
    """local (this node's engine), pipeline (a chain of stages, named "a+b+..."), or remote."""
    if served_by == node_name:
        return "local"
    return "pipeline" if "+" in served_by else "remote"


class RequestTrack:
    """The timings of one generation request, from arrival to its last chunk."""

    __slots__ = ("_m", "request_id", "model", "route", "served_by", "started", "first_at", "last_at",
                 "usage", "_ttft", "_itl", "_done")

    def __init__(self, metrics: GatewayMetrics, request_id: str) -> None:
        self._m = metrics
        self.request_id = request_id
        self.model = OTHER
        self.route = "none"  # never opened: refused before any holder took it
        self.served_by = ""
        self.started = time.perf_counter()
        self.first_at = 0.0
        self.last_at = 0.0
        self.usage: Usage | None = None
        self._ttft: Histogram | None = None
        self._itl: Histogram | None = None
        self._done = False

    def opened(self, model: str, served_by: str) -> None:
        self.model = self._m.model_label(model, (model,))  # the router's resolved alias
        self.served_by = served_by
        self.route = route_kind(served_by, self._m.node_name)
        self._ttft = self._m.ttft.labels(self.model, self.route)
        self._itl = self._m.itl.labels(self.model, self.route)

    def chunk(self, chunk: Chunk) -> None:
        now = time.perf_counter()
        n = len(chunk.token_ids)
        if chunk.usage is not None:
            self.usage = chunk.usage
        if not n and not chunk.text:
            return
        if self.first_at == 0.0:
            self.first_at = now
            if self._ttft is not None:
                self._ttft.observe(now - self.started)
        elif self._itl is not None:
            self._itl.observe((now - self.last_at) / max(1, n))  # a chunk of n tokens: n gaps
        self.last_at = now

    def finish(self, status: str) -> None:
        """status: the HTTP status ("200", "429", ...), "stream_error" or "cancelled". Once only."""
        if self._done:
            return
        self._done = True
        m = self._m
        m.requests.labels(self.model, self.route, status).inc()
        usage = self.usage
        if usage is not None:
            m.prompt_tokens.labels(self.model).inc(usage.prompt_tokens)
            m.generated_tokens.labels(self.model).inc(usage.completion_tokens)
        ttft_s = self.first_at - self.started if self.first_at else 0.0
        total_s = time.perf_counter() - self.started
        completion = usage.completion_tokens if usage is not None else 0
        if status == "200" and self.first_at:
            decode_s = self.last_at - self.first_at
            rate = (completion - 1) / decode_s if completion > 1 and decode_s > 0 else 0.0
            m.recent.append(Finished(self.model, self.route, time.time(), ttft_s, rate, completion))
        if request_log.isEnabledFor(logging.INFO):
            fields = {
                "request_id": self.request_id, "model": self.model, "route": self.route,
                "served_by": self.served_by, "status": status,
                "prompt_tokens": usage.prompt_tokens if usage is not None else 0,
                "completion_tokens": completion,
                "ttft_ms": round(ttft_s * 1000, 1), "total_ms": round(total_s * 1000, 1),
            }
            request_log.info("request %s", " ".join(f"{k}={v}" for k, v in fields.items()),
                             extra={"fields": fields})


def summary(metrics: GatewayMetrics, now_s: float, window_s: float = 300.0) -> dict:
    """The dashboard's live figures: medians over recent requests (within `window_s`), per model."""
    recent = [f for f in metrics.recent if now_s - f.at_s <= window_s]
    by_model: dict[str, list[Finished]] = {}
    for f in recent:
        by_model.setdefault(f.model, []).append(f)
    return {
        "window_s": window_s,
        "requests": len(recent),
        "ttft_ms_p50": _median_ms([f.ttft_s for f in recent]),
        "decode_tok_s_p50": _median([f.decode_tok_s for f in recent if f.decode_tok_s > 0]),
        "models": {
            model: {
                "requests": len(rows),
                "ttft_ms_p50": _median_ms([f.ttft_s for f in rows]),
                "decode_tok_s_p50": _median([f.decode_tok_s for f in rows if f.decode_tok_s > 0]),
                "routes": sorted({f.route for f in rows}),
            }
            for model, rows in by_model.items()
        },
    }


def _median(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    mid = len(ordered) // 2
    value = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return round(value, 2)


def _median_ms(values: list[float]) -> float:
    return round(_median([v * 1000 for v in values]), 1)


METRICS_KEY = web.AppKey("metrics", GatewayMetrics)
