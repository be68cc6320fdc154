"""A client hanging up mid-stream counts as "cancelled" however the gateway learns of it.

aiohttp tells the handler in one of two ways: its task is cancelled (connection_lost, with
handler_cancellation), or, when the handler writes several chunks without yielding to the loop (tokens
that queued up while the loop lagged behind the engine, as on a loaded machine), a write raises
ClientConnectionResetError ("Cannot write to closing transport") before connection_lost has run.
The gateway app over a fake backend whose tokens come in such a burst: the second way, every time.
This is the race behind the occasional failure of test_metrics.py's test_a_cancelled_stream_is_counted_as_cancelled
under load."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from core.serving import Generation, ModelListing
from core.types import Chunk
from gateway import build_app
from gateway.metrics import METRICS_KEY, GatewayMetrics

MODEL = "m"
HANGUPS = 5


class LaggingBackend:
    """Tokens in bursts the loop writes back to back: the engine ran ahead while the loop was busy."""

    node_name = "fake"

    def list_models(self) -> list[ModelListing]:
        return [ModelListing(MODEL, "a" * 64, 30, 2048, ("fake",))]

    def describe_self(self) -> dict:
        return {}

    async def open_generation(self, model: str, request: object) -> Generation:
        async def rest() -> AsyncIterator[Chunk]:
            for _ in range(2000):
                time.sleep(0.001)  # noqa: ASYNC251 - on purpose: the loop lags, the next chunk is ready
                yield Chunk(text="x", token_ids=[1])

        return Generation("fake", Chunk(text="x", token_ids=[1]), rest())


@pytest.fixture
def served() -> Iterator[tuple[str, GatewayMetrics]]:
    loop = asyncio.new_event_loop()
    app = build_app(LaggingBackend())
    metrics = GatewayMetrics(CollectorRegistry(), "fake")
    app[METRICS_KEY] = metrics
    runner = web.AppRunner(app, handler_cancellation=True)  # as node/daemon.py serves it
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", metrics
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def counted(metrics: GatewayMetrics) -> dict[str, float]:
    return {s.labels["status"]: s.value for family in metrics.registry.collect() if family.name == "meshllm_requests"
            for s in family.samples if s.name == "meshllm_requests_total"}


def test_a_client_hanging_up_during_a_burst_of_tokens_is_counted_as_cancelled(served):
    url, metrics = served
    body = json.dumps({"model": MODEL, "prompt": "p", "max_tokens": 2000, "stream": True}).encode()
    for _ in range(HANGUPS):
        resp = urllib.request.urlopen(urllib.request.Request(url + "/v1/completions", data=body,
                                                             headers={"Content-Type": "application/json"}), timeout=30)
        for i, _ in enumerate(resp):
            if i >= 6:
                break
        resp.close()
    deadline = time.monotonic() + 10
    while sum(counted(metrics).values()) < HANGUPS:
        assert time.monotonic() < deadline, f"only {counted(metrics)} of {HANGUPS} requests were counted"
        time.sleep(0.05)
    assert counted(metrics) == {"cancelled": HANGUPS}
