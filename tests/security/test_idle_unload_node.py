"""A range the mesh made a node load (LoadShard) is unloaded once idle, and the node keeps serving
(issue 11, finding 15: "any member can make an offering node load a model, and nothing unloads it")."""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request

MODEL = "smollm2-135m-instruct"
BUDGET = 600_000_000  # the whole of SmolLM2 fits: one offering node loads all 30 layers
IDLE_S = 10.0  # the least --unload-idle-s allowed


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def chat(url: str) -> tuple[int, dict, dict]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}], "temperature": 0, "max_tokens": 8}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def wait_for(what: str, check, timeout_s: float, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval_s)


def test_a_range_loaded_on_request_is_unloaded_when_idle_and_the_node_keeps_serving(node_factory) -> None:
    secret = "idle-" + secrets.token_hex(4)
    idle = ("--unload-idle-s", str(IDLE_S), "--unload-check-s", "0.25")
    nodes = node_factory.many({
        "G": ("--no-model", "--mesh-secret", secret),
        "O": ("--offer", MODEL, "--memory-budget", str(BUDGET), "--threads", "1", *idle, "--mesh-secret", secret),
        # a node the user started with a range, in a mesh of its own: its range is never unloaded
        "S": ("--shard", f"{MODEL}:0-7", "--threads", "1", "--unload-idle-s", "10", "--unload-check-s", "0.1",
              "--mesh-secret", "own-" + secrets.token_hex(4)),
    })
    gateway, offer, own = nodes["G"], nodes["O"], nodes["S"]
    offer_id = get_json(offer.url + "/mesh/self")["node_id"]
    wait_for("the gateway to list O", lambda: any(p["node_id"] == offer_id for p in get_json(gateway.url + "/mesh/peers")), 20)

    status, headers, body = chat(gateway.url)
    done_at = time.monotonic()
    assert status == 200, body
    assert headers["X-Meshllm-Node"] == "O"
    me = get_json(offer.url + "/mesh/self")
    assert [(m["start"], m["end"]) for m in me["models"]] == [(0, 30)]
    assert me["resources"]["budget_free_bytes"] < BUDGET

    wait_for("O to unload the idle range", lambda: not get_json(offer.url + "/mesh/self")["models"], 30)
    idle_for_s = time.monotonic() - done_at
    print(f"unloaded {idle_for_s:.2f} s after the last request (limit {IDLE_S} s)")
    assert idle_for_s >= IDLE_S - 0.5, "unloaded before it was idle for --unload-idle-s"
    # its budget is back once the engine has closed: the range leaves the advert first (peers stop
    # routing here), then the engine closes off the loop and only then is its memory released
    wait_for("O's budget to come back", lambda: get_json(offer.url + "/mesh/self")["resources"]["budget_free_bytes"] == BUDGET, 15)

    def gateway_sees_no_range() -> bool:
        peers = {p["node_id"]: p for p in get_json(gateway.url + "/mesh/peers")}
        return offer_id in peers and not peers[offer_id]["models"]
    wait_for("the re-published advert without the range", gateway_sees_no_range, 10)

    assert [(m["start"], m["end"]) for m in get_json(own.url + "/mesh/self")["models"]] == [(0, 7)]

    # the node keeps serving: the next request loads the range again
    status, headers, again = chat(gateway.url)
    assert status == 200, again
    assert again["choices"][0]["message"]["content"] == body["choices"][0]["message"]["content"]
    assert [(m["start"], m["end"]) for m in get_json(offer.url + "/mesh/self")["models"]] == [(0, 30)]
    assert offer.proc.poll() is None and own.proc.poll() is None
