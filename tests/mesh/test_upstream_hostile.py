"""A node fronting a hostile upstream (a tiny HTTP server written here): every field of the client's
body reaches it untouched; garbage, a silent upstream and a huge answer each give a clean 502; its error
keeps its message; and the node keeps serving throughout. Requests go to a second node (G), so the
relay crosses the data plane."""

from __future__ import annotations

import json
import secrets
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import free_port

MODELS = ["echo", "garbage", "slow", "huge", "error400", "hugeline", "cut", "bare_done"]


class Hostile(BaseHTTPRequestHandler):
    received: list[dict] = []
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _json(self, status: int, obj: object) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "test"} for m in MODELS]})
        else:
            self._json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Hostile.received.append(body)
        model = body.get("model")
        if model == "error400":
            return self._json(400, {"error": {"message": "the upstream does not like this", "type": "invalid_request_error"}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            if model == "echo":
                event = {"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}]}
                self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                event = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
                self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\ndata: [DONE]\n\n")
            elif model == "garbage":
                self.wfile.write(b"\x00\xffthis is not an event stream\n\n")
            elif model == "slow":
                time.sleep(8)
            elif model == "huge":  # valid events without end
                event = b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": "x" * 60000}}]}).encode() + b"\n\n"
                for _ in range(3000):
                    self.wfile.write(event)
            elif model == "hugeline":  # one line that never ends
                for _ in range(64):
                    self.wfile.write(b"data: " + b"y" * (1 << 16))
            elif model == "cut":  # a good start, then the connection drops
                event = {"choices": [{"index": 0, "delta": {"content": "half"}, "finish_reason": None}]}
                self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            elif model == "bare_done":  # a good start, then [DONE] with no finish reason (an interrupted answer)
                event = {"choices": [{"index": 0, "delta": {"content": "half"}, "finish_reason": None}]}
                self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\ndata: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass


def post(url: str, body: dict, timeout_s: float = 30) -> tuple[int, dict | str]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            raw = resp.read().decode()
            return resp.status, (json.loads(raw) if raw.startswith("{") else raw)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def mesh(module_node_factory):
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Hostile)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    secret = "hostile-" + secrets.token_hex(4)
    started = module_node_factory.many({
        "U": ("--upstream", f"http://127.0.0.1:{port}/v1", "--upstream-timeout-s", "2", "--mesh-secret", secret),
        "G": ("--no-model", "--mesh-secret", secret)})
    u, g = started["U"], started["G"]
    wait_for(lambda: len(get_json(g.url + "/v1/models")["data"]) == len(MODELS), 20, "G to list the upstream's models")
    yield {"U": u, "G": g}
    server.shutdown()
    server.server_close()
    thread.join(5)


def chat(node, model: str, **extra) -> tuple[int, dict | str]:
    return post(node.url + "/v1/chat/completions",
                {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra})


def test_models_have_upstream_ids_that_are_no_gguf_digest(mesh):
    ids = {m["id"]: m["meshllm"]["digest"] for m in get_json(mesh["G"].url + "/v1/models")["data"]}
    assert set(ids) == set(MODELS)
    for name, model_id in ids.items():
        assert model_id.startswith("upstream:openai:") and model_id.endswith(":" + name)


def test_every_field_reaches_the_upstream_untouched(mesh):
    Hostile.received.clear()
    extra = {"top_k": 7, "repetition_penalty": 1.1, "chat_template_kwargs": {"enable_thinking": False},
             "guided_choice": ["a", "b"], "user": "u-1", "temperature": 0.3, "max_tokens": 9}
    status, body = chat(mesh["G"], "echo", **extra)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "ok"
    assert body["usage"]["prompt_tokens"] == 3 and body["usage"]["completion_tokens"] == 1
    sent = Hostile.received[-1]
    for key, value in extra.items():
        assert sent[key] == value, key
    assert sent["messages"] == [{"role": "user", "content": "hi"}] and sent["model"] == "echo"


def test_streamed_through_the_mesh(mesh):
    status, text = chat(mesh["G"], "echo", stream=True, stream_options={"include_usage": True})
    assert status == 200
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == "ok"
    assert events[-1]["usage"]["completion_tokens"] == 1
    assert text.rstrip().endswith("data: [DONE]")


def test_upstream_error_keeps_its_message(mesh):
    status, body = chat(mesh["G"], "error400")
    assert status == 400
    assert "the upstream does not like this" in body["error"]["message"]


@pytest.mark.parametrize("model", ["garbage", "slow", "huge", "hugeline", "cut", "bare_done"])
def test_bad_answers_are_a_clean_502_and_the_node_keeps_serving(mesh, model):
    started = time.monotonic()
    status, body = chat(mesh["G"], model, max_tokens=4)
    assert status == 502, body
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    assert time.monotonic() - started < 30
    for node in (mesh["G"], mesh["U"]):
        assert chat(node, "echo")[0] == 200
        assert node.proc.poll() is None
