"""Any-node gateway with real processes: A (no model) routes to B and C (both hold the model)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import grpc
import openai
import pytest

from dataplane import rpc

MODEL = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


def get_json(url: str) -> dict | list:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def mesh(module_node_factory):
    secret = "routing-" + secrets.token_hex(4)
    nodes = module_node_factory.many({
        "A": ("--no-model", "--mesh-secret", secret),
        "B": ("--threads", "1", "--ctx-size", "2048", "--mesh-secret", secret),
        "C": ("--threads", "1", "--ctx-size", "2048", "--mesh-secret", secret),
    })
    wait_for(lambda: {p["name"] for p in get_json(nodes["A"].url + "/mesh/peers")} >= {"B", "C"}, 15,
             "A to see B and C")
    return nodes


def client(node) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_at_a_list_the_mesh_model_once_with_its_holders(mesh):
    models = get_json(mesh["A"].url + "/v1/models")["data"]
    assert [m["id"] for m in models] == [MODEL]
    assert sorted(models[0]["meshllm"]["nodes"]) == ["B", "C"]


def test_chat_at_a_is_served_by_b_or_c(mesh):
    raw = client(mesh["A"]).chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=24)
    assert raw.headers["X-Meshllm-Node"] in ("B", "C")
    full = raw.parse()
    assert full.choices[0].message.content and full.usage.completion_tokens > 0

    raw_stream = client(mesh["A"]).chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=24, stream=True)
    assert raw_stream.headers["X-Meshllm-Node"] in ("B", "C")
    text = "".join(c.choices[0].delta.content or "" for c in raw_stream.parse() if c.choices)
    assert text == full.choices[0].message.content


def test_completions_and_embeddings_are_routed(mesh):
    c = client(mesh["A"])
    assert c.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0).choices[0].text
    emb = c.embeddings.create(model=MODEL, input=["a", "b"])
    assert [len(d.embedding) for d in emb.data] == [576, 576]


def test_concurrent_requests_are_spread_over_both_holders(mesh):
    served: list[str] = []

    def call(i: int) -> None:
        raw = client(mesh["A"]).chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i + 3}."}], temperature=0, max_tokens=48)
        served.append(raw.headers["X-Meshllm-Node"])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = Counter(served)
    assert len(served) == 8 and counts["B"] >= 2 and counts["C"] >= 2, counts


def test_unknown_model_is_404_listing_the_mesh_models(mesh):
    with pytest.raises(openai.NotFoundError) as e:
        client(mesh["A"]).chat.completions.create(model="llama-900b", messages=MESSAGES)
    assert MODEL in str(e.value)


def _grpc_address(node) -> str:
    return get_json(node.url + "/mesh/self")["addresses"]["grpc"]


def test_garbage_on_the_grpc_port_does_not_disturb_the_node(mesh):
    for name in ("A", "B"):
        host, port = _grpc_address(mesh[name]).rsplit(":", 1)
        for payload in (os.urandom(4096), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(512), b"\x00" * 100000):
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(payload)
    # A well-formed gRPC call from a non-member is refused with a status, not a crash: without a member's
    # certificate it fails the TLS handshake (tests/security/test_dataplane_mtls.py covers the token).
    with grpc.insecure_channel(_grpc_address(mesh["B"])) as channel:
        generate = channel.unary_stream(rpc.method_path("Generate"))
        with pytest.raises(grpc.RpcError) as e:
            list(generate(b"\xc1garbage", timeout=5))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    for name in ("A", "B"):
        assert get_json(mesh[name].url + "/health") == {"status": "ok"}
    assert client(mesh["A"]).completions.create(model=MODEL, prompt="Hi", max_tokens=3).choices[0].text is not None


def test_client_hanging_up_at_a_stops_the_holders_generation(mesh):
    resp = _stream(mesh["A"].url, {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 2000,
                                   "stream": True})
    holder = mesh[resp.headers["X-Meshllm-Node"]]
    for i, _ in enumerate(resp):
        if i >= 8:
            break
    assert get_json(holder.url + "/mesh/self")["load"]["active"] == 1
    resp.close()
    # 2000 tokens would take the holder half a minute; a cancelled call frees its slot at once.
    wait_for(lambda: get_json(holder.url + "/mesh/self")["load"]["active"] == 0, 3, "the holder to stop")


def _stream(url: str, body: dict):
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=60)


def test_holder_killed_mid_stream_completes_elsewhere_or_errors_fast(mesh):
    """Runs last in this module: it kills whichever of B and C serves the stream."""
    body = {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 200, "stream": True}
    reference = client(mesh["A"]).chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=200).choices[0].message.content
    resp = _stream(mesh["A"].url, body)
    victim_name = resp.headers["X-Meshllm-Node"]
    survivor = "C" if victim_name == "B" else "B"
    pieces = []
    for line in resp:
        if line.startswith(b"data: {"):
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0]["delta"].get("content"):
                pieces.append(event["choices"][0]["delta"]["content"])
        if len(pieces) >= 10:
            break
    before_kill = "".join(pieces)
    mesh[victim_name].stop(signal.SIGKILL)
    killed_at = time.monotonic()
    finish, error = None, None
    for line in resp:
        if line.startswith(b"data: [DONE]"):
            break
        if line.startswith(b"data: {"):
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
                continue
            for choice in event.get("choices", []):
                pieces.append(choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
    elapsed = time.monotonic() - killed_at
    assert elapsed < 15, elapsed
    text = "".join(pieces)
    # With C alive the stream is resumed there rather than ended with an error event.
    assert error is None and finish in ("stop", "length"), error
    if error is None:
        assert text.startswith(before_kill) and len(text) > len(before_kill)
        # Resumed where it broke off: what follows the kill point continues the greedy answer
        # instead of starting it over.
        n = len(before_kill) + 20
        assert text[:n] == reference[:n]
    raw = client(mesh["A"]).chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=8)
    assert raw.headers["X-Meshllm-Node"] == survivor
