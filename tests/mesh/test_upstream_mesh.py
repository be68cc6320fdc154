"""A real upstream, llama-cpp-python's own OpenAI server (`python -m llama_cpp.server`) serving the
embedded SmolLM2 GGUF, fronted by node U; node G holds no model. G serves chat, completions and
streaming through the mesh; the upstream killed, the model leaves G's /v1/models within the advert
period and requests get 404; restarted, it comes back."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from engine.model_file import resolve_path
from tests.conftest import REPO, free_port, stop_proc

SERVED = "smollm2"
ADVERT_PERIOD_S = 2.5  # discovery's heartbeat period (docs/architecture.md)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_upstream(port: int) -> subprocess.Popen:
    gguf = resolve_path("smollm2-135m-instruct")[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", SERVED,
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "1", "--verbose", "False"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ready() -> bool:
        try:
            return SERVED in json.dumps(get_json(f"http://127.0.0.1:{port}/v1/models"))
        except (OSError, ValueError):
            assert proc.poll() is None, "llama_cpp.server exited"
            return False

    wait_for(ready, 60, "llama_cpp.server to answer")
    return proc


def models_at(node) -> list[str]:
    return [m["id"] for m in get_json(node.url + "/v1/models")["data"]]


@pytest.fixture(scope="module")
def mesh(module_node_factory):
    port = free_port()
    upstream = start_upstream(port)
    secret = "upstream-" + secrets.token_hex(4)
    started = module_node_factory.many({"U": ("--upstream", f"http://127.0.0.1:{port}", "--mesh-secret", secret),
                                        "G": ("--no-model", "--mesh-secret", secret)})
    u, g = started["U"], started["G"]
    wait_for(lambda: SERVED in models_at(g), 20, "G to list the upstream's model")
    state = {"U": u, "G": g, "port": port, "upstream": upstream}
    yield state
    stop_proc(state["upstream"])


def client(node) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_listed_at_g_with_an_upstream_id(mesh):
    (model,) = get_json(mesh["G"].url + "/v1/models")["data"]
    assert model["id"] == SERVED and model["meshllm"]["nodes"] == ["U"]
    assert model["meshllm"]["digest"].startswith("upstream:openai:")


def test_chat_at_g(mesh):
    raw = client(mesh["G"]).chat.completions.with_raw_response.create(
        model=SERVED, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, temperature=0)
    assert raw.headers["X-Meshllm-Node"] == "U"
    answer = raw.parse()
    assert answer.choices[0].message.content
    assert answer.usage.completion_tokens >= 1 and answer.usage.prompt_tokens > 0


def test_completion_at_g(mesh):
    answer = client(mesh["G"]).completions.create(model=SERVED, prompt="The sea is", max_tokens=6, temperature=0)
    assert answer.choices[0].text and answer.choices[0].finish_reason in ("length", "stop")


QUESTIONS = ("Name three fruits.", "Describe the sea in one sentence.", "Count to five.", "Say hello.")


def streamed_at(node, question: str) -> str:
    """The answer streamed through `node` (its usage checked against the pieces received)."""
    chunks = list(client(node).chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": question}], max_tokens=12, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    # llama-cpp-python counts no usage when streaming: the node counts the upstream's content events
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(pieces)
    return "".join(pieces)


def direct_answer(mesh, question: str) -> str:
    direct = openai.OpenAI(base_url=f"http://127.0.0.1:{mesh['port']}/v1", api_key="x", max_retries=0)
    return direct.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": question}],
                                          max_tokens=12, temperature=0).choices[0].message.content


def test_streamed_chat_at_g_equals_the_upstream_directly(mesh):
    """llama-cpp-python's server ends the answer in progress when any other request arrives, its model
    list included: U's poll (every second) once cut streams short, each ending in a bare [DONE] that
    passed for a whole answer. Eight streams in a row span several polls; every one must be whole."""
    direct = {q: direct_answer(mesh, q) for q in QUESTIONS}
    for question in QUESTIONS * 2:
        text = streamed_at(mesh["G"], question)
        assert text and text == direct[question], question


def test_concurrent_streams_at_g_each_get_the_whole_answer(mesh):
    """The node sends that server one request at a time: concurrent clients queue, none cuts another."""
    direct = {q: direct_answer(mesh, q) for q in QUESTIONS[:3]}
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda q: streamed_at(mesh["G"], q), QUESTIONS[:3]))
    assert answers == [direct[q] for q in QUESTIONS[:3]]


def test_killed_upstream_leaves_and_comes_back(mesh):
    g = mesh["G"]
    stop_proc(mesh["upstream"])
    killed = time.monotonic()
    wait_for(lambda: SERVED not in models_at(g), 15, "the model to leave G's /v1/models")
    left_s = time.monotonic() - killed
    print(f"model left G's /v1/models {left_s:.2f} s after the upstream was killed")
    assert left_s <= 2 * ADVERT_PERIOD_S + 1.5  # one poll (1 s) + one advert on change, with slack for CI
    try:
        client(g).chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        raise AssertionError("expected 404")
    except openai.NotFoundError:
        pass
    mesh["upstream"] = start_upstream(mesh["port"])
    back = time.monotonic()
    wait_for(lambda: SERVED in models_at(g), 15, "the model to come back")
    print(f"model back at G {time.monotonic() - back:.2f} s after the upstream answered again")
    answer = client(g).chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert answer.choices[0].message.content


def test_node_with_a_local_model_beside_an_upstream(mesh, node_factory):
    """Several engines on one node: a local GGUF and the upstream's model side by side."""
    secret = "beside-" + secrets.token_hex(4)
    both = node_factory("B", "--model", "smollm2-135m-instruct", "--threads", "1", "--ctx-size", "1024",
                        "--upstream", f"http://127.0.0.1:{mesh['port']}", "--mesh-secret", secret)
    assert sorted(models_at(both)) == [SERVED, "smollm2-135m-instruct"]
    for model in (SERVED, "smollm2-135m-instruct"):
        answer = client(both).chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=3)
        assert answer.choices[0].message.content is not None
