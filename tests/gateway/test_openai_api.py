"""One real node process with the embedded model, driven through the official openai SDK and raw HTTP."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

MODEL = "smollm2-135m-instruct"
HIDDEN_SIZE = 576
MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def node(module_node_factory):
    return module_node_factory("api-node", "--threads", "2", "--ctx-size", "2048", "--max-queue", "2")


@pytest.fixture(scope="module")
def client(node):
    return openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(node, path: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict, dict]:
    req = urllib.request.Request(node.url + path, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def get_json(node, path: str) -> dict:
    with urllib.request.urlopen(node.url + path, timeout=30) as resp:
        return json.loads(resp.read())


def test_models_lists_the_default_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_chat_stream_joins_to_the_non_streamed_greedy_answer(client):
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=32)
    text = full.choices[0].message.content
    assert text and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens > 0 and full.usage.prompt_tokens > 5

    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=32, stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finishes, usage = [], [], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    assert "".join(pieces) == text
    assert finishes == [full.choices[0].finish_reason]
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens


def test_max_tokens_gives_finish_reason_length(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


def test_completions_stream_and_not(client):
    r = client.completions.create(model=MODEL, prompt="The sky is", temperature=0, max_tokens=12)
    assert r.choices[0].text
    joined = "".join(
        c.choices[0].text
        for c in client.completions.create(model=MODEL, prompt="The sky is", temperature=0, max_tokens=12, stream=True)
        if c.choices
    )
    assert joined == r.choices[0].text


def test_seeded_sampling_is_reproducible(client):
    def run():
        return client.chat.completions.create(
            model=MODEL, messages=MESSAGES, temperature=1.0, top_p=0.9, seed=1234, max_tokens=16
        ).choices[0].message.content

    assert run() == run()


def test_stop_string_is_not_emitted(client):
    base = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=16)
    text = base.choices[0].text
    assert "7" in text
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=16, stop=["7"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.index("7")]


def test_embeddings_have_hidden_size(client):
    r = client.embeddings.create(model=MODEL, input=["hello world", "goodbye"])
    assert len(r.data) == 2
    assert all(len(d.embedding) == HIDDEN_SIZE for d in r.data)
    assert r.data[0].embedding != r.data[1].embedding
    assert r.usage.prompt_tokens > 0


def test_every_response_names_the_node(node):
    status, headers, _ = post(node, "/v1/chat/completions", b"{")
    assert status == 400 and headers["X-Meshllm-Node"] == "api-node"
    with urllib.request.urlopen(node.url + "/health") as resp:
        assert resp.headers["X-Meshllm-Node"] == "api-node"


def test_mesh_self_describes_the_node(node):
    me = get_json(node, "/mesh/self")
    assert me["name"] == "api-node" and len(me["node_id"]) == 32
    (model,) = me["models"]
    assert model["alias"] == MODEL and model["n_layers"] == 30 and len(model["digest"]) == 64
    assert me["resources"]["ram_total_bytes"] > 0
    assert set(me["load"]) == {"active", "queued", "capacity"}


BAD_REQUESTS = [
    # (path, body, status, param or code fragment)
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[]", 400, None),
    ("/v1/chat/completions", json.dumps({"model": MODEL}).encode(), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": []}).encode(), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"model": 7, "messages": MESSAGES}).encode(), 400, "model"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": MESSAGES, "temperature": "hot"}).encode(), 400, "temperature"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": -5}).encode(), 400, "max_tokens"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 10**12}).encode(), 400, "max_tokens"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 100000}).encode(), 400, "max_tokens"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": True}).encode(), 400, "max_tokens"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "role"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": 5}]}).encode(), 400, "content"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": MESSAGES, "stop": [1]}).encode(), 400, "stop"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": MESSAGES, "n": 9}).encode(), 400, "n"),
    ("/v1/chat/completions", json.dumps({"model": "no-such-model", "messages": MESSAGES}).encode(), 404, "model"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": 12}).encode(), 400, "prompt"),
    ("/v1/embeddings", json.dumps({"model": MODEL, "input": [1.5, 2]}).encode(), 400, "input"),
    ("/v1/embeddings", json.dumps({"model": "nope", "input": "x"}).encode(), 404, "model"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_input_gets_a_clear_error_and_the_node_keeps_serving(node, path, body, status, param):
    got, _, payload = post(node, path, body)
    assert got == status, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert param in (error["param"] or "")
    if status == 404:
        assert MODEL in error["message"]  # the message lists what is available
    assert get_json(node, "/health") == {"status": "ok"}


def test_ten_megabyte_body_is_refused(node):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (10 << 20)}]}).encode()
    status, _, payload = post(node, "/v1/chat/completions", body)
    assert status == 413 and payload["error"]["code"] == "body_too_large"
    assert get_json(node, "/health") == {"status": "ok"}


def _wait_idle(node, timeout_s: float = 10) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        load = get_json(node, "/mesh/self")["load"]
        if (load["active"], load["queued"]) == (0, 0) or time.monotonic() > deadline:
            return load
        time.sleep(0.05)


def test_client_disconnect_cancels_generation(node, client):
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=1500, stream=True
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert get_json(node, "/mesh/self")["load"]["active"] == 1
    stream.close()
    # 1500 tokens at ~100 tok/s would take 15 s; a cancelled one frees its slot at once.
    assert _wait_idle(node, timeout_s=3) == {"active": 0, "queued": 0, "capacity": 3}


def test_full_queue_answers_429_with_retry_after(node):
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 150}).encode()
    results: list[tuple[int, dict]] = []

    def call() -> None:
        status, headers, _ = post(node, "/v1/chat/completions", body)
        results.append((status, headers))

    threads = [threading.Thread(target=call) for _ in range(5)]  # capacity is 1 running + 2 queued
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(s for s, _ in results)
    assert statuses.count(200) >= 3 and 429 in statuses, statuses
    assert all(int(h["Retry-After"]) >= 1 for s, h in results if s == 429)
    _wait_idle(node)
