"""Auto split: nodes offering a GGUF with budgets too small for the whole model serve it together."""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request

MODEL = "smollm2-135m-instruct"
# The torch engine needs ~1.1 GB for the whole model (fp32 weights + KV for 8 x 2048 tokens);
# three budgets of 520 MB hold it only when split.
BUDGET = str(520_000_000)


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def chat(url: str, max_tokens: int = 16) -> tuple[int, dict, dict]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}], "temperature": 0,
            "max_tokens": max_tokens, "return_token_ids": True}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_three_small_nodes_load_and_serve_a_split(node_factory):
    secret = "auto-" + secrets.token_hex(4)
    gateway = node_factory("G", "--no-model", "--mesh-secret", secret)
    offers = [node_factory(f"O{i}", "--offer", MODEL, "--memory-budget", BUDGET, "--threads", "1",
                           "--mesh-secret", secret) for i in range(3)]
    deadline = time.monotonic() + 20
    while len(get_json(gateway.url + "/mesh/peers")) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert [m["id"] for m in get_json(gateway.url + "/v1/models")["data"]] == [MODEL]

    status, headers, body = chat(gateway.url)
    assert status == 200, body
    served_by = headers["X-Meshllm-Node"].split("+")
    assert sorted(served_by) == ["O0", "O1", "O2"]  # no node could hold it alone
    ranges = []
    for node in offers:
        me = get_json(node.url + "/mesh/self")
        (held,) = me["models"]
        assert not held["whole"]
        ranges.append((held["start"], held["end"]))
        assert me["resources"]["budget_free_bytes"] < int(BUDGET)
    ranges.sort()
    assert ranges[0][0] == 0 and ranges[-1][1] == 30
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))

    # The same answer again, now from the loaded chain (no second placement).
    status, headers, again = chat(gateway.url)
    assert status == 200 and again["choices"][0]["token_ids"] == body["choices"][0]["token_ids"]


def test_a_model_too_big_for_every_offer_is_a_clear_503(node_factory):
    secret = "auto-" + secrets.token_hex(4)
    gateway = node_factory("G", "--no-model", "--mesh-secret", secret)
    node_factory("O", "--offer", MODEL, "--memory-budget", BUDGET, "--mesh-secret", secret)
    deadline = time.monotonic() + 20
    while not get_json(gateway.url + "/mesh/peers"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    status, _, body = chat(gateway.url)
    assert status == 503 and "short by" in body["error"]["message"]
