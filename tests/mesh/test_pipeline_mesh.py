"""Pipeline-parallel serving with real node processes: layer ranges on several nodes, driven through
the OpenAI API at a node holding no layers, against the torch whole-model engine as the reference."""

from __future__ import annotations

import json
import secrets
import signal
import threading
import time
import urllib.request

import pytest

MODEL = "smollm2-135m-instruct"
PROMPT = "Once upon a time, in a small village by the sea, there lived"
CHAT = [{"role": "user", "content": "Write a short poem about the moon."}]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def post(url: str, path: str, body: dict) -> tuple[dict, dict]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return dict(resp.headers), json.loads(resp.read())


def stream(url: str, path: str, body: dict) -> tuple[str, list[int], str | None, dict | None]:
    req = urllib.request.Request(url + path, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    text, ids, finish, error = [], [], None, None
    with urllib.request.urlopen(req, timeout=300) as resp:
        for line in resp:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
                continue
            for choice in event["choices"]:
                text.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
                ids.extend(choice.get("token_ids") or [])
                finish = choice["finish_reason"] or finish
    return "".join(text), ids, finish, error


def wait_for_model(url: str, nodes: list[str], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        models = get_json(url + "/v1/models")["data"]
        if models and models[0]["meshllm"]["nodes"] == nodes:
            return
        time.sleep(0.2)
    raise AssertionError(f"{url} never listed a pipeline over {nodes}")


@pytest.fixture(scope="module")
def meshes(module_node_factory):
    """A torch whole-model reference alone in its mesh; a 2-stage and a 3-stage mesh with uneven splits."""
    two, three = "p2-" + secrets.token_hex(4), "p3-" + secrets.token_hex(4)
    one = ("--threads", "1")
    nodes = module_node_factory.many({
        "W": ("--engine", "torch", *one, "--mesh-secret", "ref-" + secrets.token_hex(4)),
        "G2": ("--no-model", "--mesh-secret", two),
        "S1": ("--shard", f"{MODEL}:0-7", *one, "--mesh-secret", two),
        "S2": ("--shard", f"{MODEL}:7-30", *one, "--mesh-secret", two),
        "G3": ("--no-model", "--mesh-secret", three),
        "T1": ("--shard", f"{MODEL}:0-5", *one, "--mesh-secret", three),
        "T2": ("--shard", f"{MODEL}:5-17", *one, "--mesh-secret", three),
        "T3": ("--shard", f"{MODEL}:17-30", *one, "--mesh-secret", three),
    })
    wait_for_model(nodes["G2"].url, ["S1", "S2"])
    wait_for_model(nodes["G3"].url, ["T1", "T2", "T3"])
    return nodes


GREEDY = {"model": MODEL, "temperature": 0, "max_tokens": 64, "return_token_ids": True}


@pytest.fixture(scope="module")
def references(meshes) -> dict[str, dict]:
    """The whole model's greedy answer per kind, asked once: both gateways are held to the same one."""
    return {}


@pytest.mark.parametrize("gateway", ["G2", "G3"])
@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_pipeline_tokens_match_the_whole_model(meshes, references, gateway, kind):
    path, body = ("/v1/completions", {**GREEDY, "prompt": PROMPT}) if kind == "completion" else (
        "/v1/chat/completions", {**GREEDY, "messages": CHAT})
    if kind not in references:
        references[kind] = post(meshes["W"].url, path, body)[1]
    reference = references[kind]
    ref_ids = reference["choices"][0]["token_ids"]
    assert len(ref_ids) >= 16
    headers, piped = post(meshes[gateway].url, path, body)
    assert headers["X-Meshllm-Node"] == ("S1+S2" if gateway == "G2" else "T1+T2+T3")
    assert piped["choices"][0]["token_ids"] == ref_ids
    assert piped["choices"][0] == reference["choices"][0]
    assert piped["usage"] == reference["usage"]
    text, ids, finish, error = stream(meshes[gateway].url, path, body)
    assert error is None and ids == ref_ids and finish == reference["choices"][0]["finish_reason"]
    ref_choice = reference["choices"][0]
    assert text == (ref_choice["text"] if kind == "completion" else ref_choice["message"]["content"])


def test_four_concurrent_streams_match_their_solo_runs(meshes):
    prompts = [f"{PROMPT} {name}" for name in ("Anna", "Bob", "Chloe", "Dmitri")]
    solo = [post(meshes["G2"].url, "/v1/completions", {**GREEDY, "max_tokens": 32, "prompt": p})[1]["choices"][0]["text"]
            for p in prompts]
    together: dict[int, tuple] = {}

    def run(i: int) -> None:
        together[i] = stream(meshes["G2"].url, "/v1/completions", {**GREEDY, "max_tokens": 32, "prompt": prompts[i]})

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together[i][0] for i in range(4)] == solo
    assert all(together[i][3] is None for i in range(4))


def _long_stream_started(url: str):
    """A 1000-token stream at `url`, read until it is well under way (its sessions open on every stage)."""
    req = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 1000, "temperature": 0, "stream": True}).encode(),
        headers={"Content-Type": "application/json"})
    resp = urllib.request.urlopen(req, timeout=60)
    for i, _ in enumerate(resp):
        if i >= 6:
            break
    return resp


def _active(node) -> int:
    return get_json(node.url + "/mesh/self")["load"]["active"]


def test_cancelled_request_frees_sessions_on_every_stage(meshes):
    resp = _long_stream_started(meshes["G3"].url)
    assert all(_active(meshes[n]) == 1 for n in ("T1", "T2", "T3"))
    resp.close()
    deadline = time.monotonic() + 5
    while any(_active(meshes[n]) for n in ("T1", "T2", "T3")):
        assert time.monotonic() < deadline, "a stage kept the cancelled session"
        time.sleep(0.1)


def test_stage_killed_mid_stream_ends_with_a_clear_error(meshes):
    """Runs last: kills the middle stage of the 3-stage pipeline."""
    resp = _long_stream_started(meshes["G3"].url)
    meshes["T2"].stop(signal.SIGKILL)
    killed = time.monotonic()
    error, done = None, False
    for line in resp:
        if line.startswith(b"data: {") and b'"error"' in line:
            error = json.loads(line[6:])["error"]
        if line.startswith(b"data: [DONE]"):
            done = True
            break
    assert time.monotonic() - killed < 15
    assert done and error is not None and error["message"]
    for name in ("T1", "T3"):
        deadline = time.monotonic() + 5
        while _active(meshes[name]):
            assert time.monotonic() < deadline, f"{name} kept the failed session"
            time.sleep(0.1)
