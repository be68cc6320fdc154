"""Auto split: nodes offering a GGUF with budgets too small for the whole model serve it together.

Budgets are 250 MB each, as in the quantized-weights issue: the torch engine holds GGUF weights as
stored, so SmolLM2 (98 MB) with the KV cache of 4 slots x 2048 tokens (189 MB) is too big for one node
and splits over two or three; dequantized (the first wave) it needed 1.4 GB. Gemma-3-270M (253 MB
file, a 178 MB Q8_0 embedding on the first stage and again as the tied head on the last) splits too.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request

from gemma3_file import gemma3_270m_path

SMOLLM2 = "smollm2-135m-instruct"
BUDGET = str(250_000_000)


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def chat(url: str, model: str, max_tokens: int = 16) -> tuple[int, dict, dict]:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello!"}], "temperature": 0,
            "max_tokens": max_tokens, "return_token_ids": True}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def _split_serves(node_factory, model_arg: str, n_layers: int) -> None:
    secret = "auto-" + secrets.token_hex(4)
    nodes = node_factory.many({"G": ("--no-model", "--mesh-secret", secret),
                               **{f"O{i}": ("--offer", model_arg, "--memory-budget", BUDGET, "--threads", "1",
                                            "--mesh-secret", secret) for i in range(3)}})
    gateway, offers = nodes["G"], [nodes[f"O{i}"] for i in range(3)]
    deadline = time.monotonic() + 20
    while len(get_json(gateway.url + "/mesh/peers")) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    (model,) = [m["id"] for m in get_json(gateway.url + "/v1/models")["data"]]

    status, headers, body = chat(gateway.url, model)
    assert status == 200, body
    served_by = headers["X-Meshllm-Node"].split("+")
    assert len(served_by) >= 2 and set(served_by) <= {"O0", "O1", "O2"}  # no node could hold it alone
    ranges = []
    for node in offers:
        me = get_json(node.url + "/mesh/self")
        for held in me["models"]:
            assert not held["whole"]
            ranges.append((held["start"], held["end"]))
            assert 0 <= me["resources"]["budget_free_bytes"] < int(BUDGET)
    ranges.sort()
    assert ranges[0][0] == 0 and ranges[-1][1] == n_layers
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))

    # The same answer again, now from the loaded chain (no second placement).
    status, headers, again = chat(gateway.url, model)
    assert status == 200 and again["choices"][0]["token_ids"] == body["choices"][0]["token_ids"]


def test_three_small_nodes_load_and_serve_a_split(node_factory):
    _split_serves(node_factory, SMOLLM2, 30)


def test_three_small_nodes_split_gemma3(node_factory):
    _split_serves(node_factory, str(gemma3_270m_path()), 18)


def test_a_model_too_big_for_every_offer_is_a_clear_503(node_factory):
    secret = "auto-" + secrets.token_hex(4)
    gateway = node_factory.many({"G": ("--no-model", "--mesh-secret", secret),
                                 "O": ("--offer", SMOLLM2, "--memory-budget", BUDGET, "--mesh-secret", secret)})["G"]
    deadline = time.monotonic() + 20
    while not get_json(gateway.url + "/mesh/peers"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    status, _, body = chat(gateway.url, SMOLLM2)
    assert status == 503 and "short by" in body["error"]["message"]

