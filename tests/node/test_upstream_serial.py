"""A server that answers like llama-cpp-python's (one answer at a time, any other request ends it) behind
the real UpstreamManager, over real HTTP on loopback: the node is never the one to interrupt it (no
model-list poll while an answer streams, one request at a time), and a generation that goes silent
still takes the upstream down, as failed polls would."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import node.upstream as upstream_mod
from core.types import GenerationRequest, SamplingParams
from engine.local_models import LocalModels
from engine.upstream import UpstreamConfig
from node.upstream import UpstreamManager

LISTING = {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "me", "permissions": []}]}


class Serial(BaseHTTPRequestHandler):
    """Lists itself as llama-cpp-python does; streams 5 chunks 0.2 s apart, or nothing until released
    ("hang"). It counts the model lists and the answers that arrive while an answer streams: on
    llama-cpp-python's server each would end that answer (its interrupt_requests)."""

    protocol_version = "HTTP/1.1"
    lists_during_answer = 0
    streaming = 0
    concurrent = 0
    release = threading.Event()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if Serial.streaming:
            Serial.lists_during_answer += 1
        body = json.dumps(LISTING if self.path == "/v1/models" else {"detail": "Not Found"}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Serial.concurrent = max(Serial.concurrent, Serial.streaming + 1)
        Serial.streaming += 1
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            if body["messages"][0]["content"] == "hang":
                Serial.release.wait(30)
                return
            for i in range(5):
                event = {"choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]}
                self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                self.wfile.flush()
                time.sleep(0.2)
            event = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
            self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\ndata: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            Serial.streaming -= 1


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Serial)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    Serial.lists_during_answer = Serial.streaming = Serial.concurrent = 0
    Serial.release.clear()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    Serial.release.set()
    srv.shutdown()
    srv.server_close()


async def _answer(local: LocalModels, text: str) -> str:
    (model,) = local.all()
    request = GenerationRequest("r", SamplingParams(max_tokens=8), messages=({"role": "user", "content": text},))
    return "".join([chunk.text async for chunk in model.runner.stream(request)])


def test_answers_are_never_interrupted_by_the_node(server: str) -> None:
    async def run() -> list[str]:
        local = LocalModels()
        manager = UpstreamManager((UpstreamConfig(server, concurrency=8, poll_s=0.1),), local, max_queue=8,
                                  on_change=lambda: None, on_load_change=lambda: None)
        await manager.start()
        try:
            assert manager.describe()[0]["models"] == ["m"]
            return await asyncio.gather(*(_answer(local, f"q{i}") for i in range(3)))
        finally:
            await manager.stop()

    answers = asyncio.run(run())
    assert answers == ["t0 t1 t2 t3 t4 "] * 3
    # three answers of 1 s each, polled every 0.1 s before: no model list while one streamed, no two at once
    assert Serial.lists_during_answer == 0 and Serial.concurrent == 1


def test_a_silent_generation_takes_the_upstream_down(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream_mod, "DOWN_AFTER_S", 1.0)

    async def run() -> float:
        local = LocalModels()
        changed = asyncio.Event()  # the node's models changed (it re-publishes its advert then)
        manager = UpstreamManager((UpstreamConfig(server, poll_s=0.1, read_timeout_s=60),), local, max_queue=8,
                                  on_change=changed.set, on_load_change=lambda: None)
        await manager.start()
        try:
            changed.clear()
            hung = asyncio.create_task(_answer(local, "hang"))
            started = time.monotonic()
            await asyncio.wait_for(changed.wait(), 10)
            assert not local.all() and manager.describe()[0]["up"] is False
            hung.cancel()
            return time.monotonic() - started
        finally:
            Serial.release.set()
            await manager.stop()

    took_s = asyncio.run(run())
    assert 0.9 <= took_s < 2.5, took_s  # DOWN_AFTER_S of silence, then the next poll
