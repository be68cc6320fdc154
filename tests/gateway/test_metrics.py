"""/metrics of real node processes, parsed with prometheus_client's own parser: counters move with real
traffic, labels never come from client text, and the API-key rule holds."""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

MODEL = "smollm2-135m-instruct"


def scrape(url: str, key: str | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with urllib.request.urlopen(urllib.request.Request(url + "/metrics", headers=headers), timeout=30) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, metric: str, **labels: str) -> float:
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


def complete(url: str, body: dict, key: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def status_of(url: str, key: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def started(module_node_factory, tmp_path_factory):
    """Every node of this module, started together (their start-ups overlap): the mesh of A and B, and
    the two lone nodes K and N (see `lone`)."""
    secret = "metrics-" + secrets.token_hex(4)
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text("sk-limited rpm=2\n")
    return module_node_factory.many({
        "B": ("--threads", "1", "--mesh-secret", secret),
        "A": ("--no-model", "--mesh-secret", secret),
        "K": ("--api-key", "sk-metrics-key", "--threads", "1", "--api-keys-file", str(keys)),
        "N": ("--no-metrics", "--threads", "1"),
    })


@pytest.fixture(scope="module")
def mesh(started):
    """B holds the model; A holds none and routes to B."""
    a, b = started["A"], started["B"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with urllib.request.urlopen(a.url + "/v1/models", timeout=10) as resp:
            if json.loads(resp.read())["data"]:
                break
        time.sleep(0.2)
    return {"A": a, "B": b}


def test_counters_move_with_traffic(mesh):
    b = mesh["B"].url
    before = scrape(b)
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    for i in range(3):
        code, body = complete(b, {"model": MODEL, "prompt": f"Count to {i}", "max_tokens": 8, "temperature": 0})
        assert code == 200
        for k in usage:
            usage[k] += body["usage"][k]
    after = scrape(b)
    ok = {"model": MODEL, "route": "local", "status": "200"}
    assert value(after, "meshllm_requests_total", **ok) - value(before, "meshllm_requests_total", **ok) == 3
    assert (value(after, "meshllm_prompt_tokens_total", model=MODEL)
            - value(before, "meshllm_prompt_tokens_total", model=MODEL)) == usage["prompt_tokens"]
    assert (value(after, "meshllm_generated_tokens_total", model=MODEL)
            - value(before, "meshllm_generated_tokens_total", model=MODEL)) == usage["completion_tokens"]
    ttft = {"model": MODEL, "route": "local"}
    assert value(after, "meshllm_time_to_first_token_seconds_count", **ttft) - value(
        before, "meshllm_time_to_first_token_seconds_count", **ttft) == 3
    assert value(after, "meshllm_time_to_first_token_seconds_sum", **ttft) > value(
        before, "meshllm_time_to_first_token_seconds_sum", **ttft)
    # 8 tokens each, in chunks of one: 7 gaps per request
    assert value(after, "meshllm_inter_token_latency_seconds_count", **ttft) - value(
        before, "meshllm_inter_token_latency_seconds_count", **ttft) == usage["completion_tokens"] - 3
    assert value(after, "meshllm_queue_wait_seconds_count", model=MODEL) - value(
        before, "meshllm_queue_wait_seconds_count", model=MODEL) == 3
    engine = {"model": MODEL, "layers": "0-30"}
    assert value(after, "meshllm_queue_capacity", **engine) == 17  # 1 slot + --max-queue 16
    assert value(after, "meshllm_queue_depth", **engine) == 0
    assert value(after, "meshllm_load_progress_ratio", what=MODEL, state="loaded") == 1.0
    assert value(after, "meshllm_node_info", name="B", node_id=_node_id(b), version=_version()) == 1


def test_routed_requests_count_as_remote_at_the_gateway_and_local_at_the_holder(mesh):
    a, b = mesh["A"].url, mesh["B"].url
    before_a, before_b = scrape(a), scrape(b)
    code, body = complete(a, {"model": MODEL, "prompt": "Hello", "max_tokens": 4})
    assert code == 200, body
    after_a, after_b = scrape(a), scrape(b)
    remote = {"model": MODEL, "route": "remote", "status": "200"}
    assert value(after_a, "meshllm_requests_total", **remote) - value(before_a, "meshllm_requests_total", **remote) == 1
    # B served it for a peer (gRPC, not its gateway): its engine queue saw it, its gateway did not
    assert value(after_b, "meshllm_queue_wait_seconds_count", model=MODEL) - value(
        before_b, "meshllm_queue_wait_seconds_count", model=MODEL) == 1
    local = {"model": MODEL, "route": "local", "status": "200"}
    assert value(after_b, "meshllm_requests_total", **local) == value(before_b, "meshllm_requests_total", **local)
    for samples in (after_a, after_b):
        assert value(samples, "meshllm_peers") == 1
        assert sum(v for (name, _), v in samples.items() if name == "meshllm_adverts_received_total") > 0
        assert value(samples, "meshllm_discovery_received_bytes_total") > 0


def test_client_text_never_becomes_a_label(mesh):
    """A client naming many models (or markup) must not make new series: they count as "other"."""
    b = mesh["B"].url
    before = scrape(b)
    for i in range(20):
        code, body = complete(b, {"model": f"no-such-model-{i}-<script>\x1b[31m", "prompt": "x", "max_tokens": 2})
        assert code == 404, body
    after = scrape(b)
    missing = {"model": "other", "route": "none", "status": "404"}
    assert value(after, "meshllm_requests_total", **missing) - value(before, "meshllm_requests_total", **missing) == 20
    labels = {v for (_, ls) in after for k, v in ls if k == "model"}
    assert labels <= {MODEL, "other"}


def test_a_cancelled_stream_is_counted_as_cancelled(mesh):
    b = mesh["B"].url
    before = scrape(b)
    # greedy: this answer runs all 500 tokens; a sampled one ends at once (0-9 tokens) one time in eight,
    # before the hang-up, and is rightly counted as 200
    body = json.dumps({"model": MODEL, "prompt": "Tell a long story.", "max_tokens": 500, "temperature": 0,
                       "stream": True}).encode()
    resp = urllib.request.urlopen(urllib.request.Request(b + "/v1/completions", data=body,
                                                         headers={"Content-Type": "application/json"}), timeout=60)
    for i, _ in enumerate(resp):
        if i >= 6:
            break
    resp.close()
    cancelled = {"model": MODEL, "route": "local", "status": "cancelled"}
    deadline = time.monotonic() + 10
    while value(now := scrape(b), "meshllm_requests_total", **cancelled) == value(
            before, "meshllm_requests_total", **cancelled):
        # counted under another status (500: the hang-up seen by a write first, test_metrics_hangup.py)
        counted = {dict(ls)["status"]: v - before.get((name, ls), 0.0) for (name, ls), v in now.items()
                   if name == "meshllm_requests_total" and v != before.get((name, ls), 0.0)}
        assert time.monotonic() < deadline, f"the cancelled stream was never counted as cancelled: {counted}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def lone(started):
    """Two nodes of meshes of their own: K has API keys, N serves no metrics."""
    return {name: started[name] for name in ("K", "N")}


def test_metrics_and_stats_need_the_key_when_the_node_has_keys(lone):
    node = lone["K"]
    for path in ("/metrics", "/mesh/stats"):
        assert status_of(node.url + path) == 401
        assert status_of(node.url + path, "sk-wrong") == 401
        assert status_of(node.url + path, "sk-metrics-key") == 200
    for _ in range(3):  # scrapes do not spend a key's request budget (rpm=2 below)
        assert status_of(node.url + "/metrics", "sk-limited") == 200
    code, _ = complete(node.url, {"model": MODEL, "prompt": "Hi", "max_tokens": 2}, key="sk-limited")
    assert code == 200
    assert status_of(node.url + "/health") == 200 and status_of(node.url + "/") == 200
    assert value(scrape(node.url, "sk-metrics-key"), "meshllm_requests_total",
                 model=MODEL, route="local", status="200") == 1


def test_no_metrics_serves_none(lone):
    node = lone["N"]
    assert status_of(node.url + "/metrics") == 404
    assert status_of(node.url + "/mesh/stats") == 404
    code, _ = complete(node.url, {"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert code == 200


def _node_id(url: str) -> str:
    with urllib.request.urlopen(url + "/mesh/self", timeout=10) as resp:
        return json.loads(resp.read())["node_id"]


def _version() -> str:
    from node.version import VERSION

    return VERSION
