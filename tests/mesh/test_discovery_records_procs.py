"""Records mode (`--records`), real processes on loopback, libp2p only: a node that holds nothing and
knows only the bootstrap node finds a model's holder through the DHT record (the holder provided the
model's keys), dials it, and serves a chat through it; a model no one holds is a 404 after a bounded
wait."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from conftest import NodeProc
from discovery_mesh_helpers import get_json, mesh_secret, node_id, peer_ids, wait_for

MODEL = "smollm2-135m-instruct"
PUT_S = 4.0  # the holder's first put (a Kademlia walk and the replicas' stores) is done by then
QUIET_S = 4.0  # the reader, told of no one but the bootstrap node, still does not know the holder
LOOKUP_WAIT_S = 8.0  # dataplane/routing/lookup.py
# the holder asks for a 4 s ttl (--advert-ttl-s, beats every 1 s): the 8 s lookup of a missing model
# already spans two of its ttls, so checking that its beats keep it known needs no extra wait
HOLDER_TTL_S = 4.0


def chat(url: str, model: str, timeout_s: float = 120) -> tuple[int, dict, dict]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hi."}],
                       "max_tokens": 8, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"{}")


def test_a_records_node_finds_the_holder_through_the_dht_and_serves_a_chat(
        node_factory: Callable[..., NodeProc]) -> None:
    secret = mesh_secret("records")
    common = ("--no-mdns", "--records", "--mesh-secret", secret)
    hub = node_factory("rec-hub", "--no-model", *common)
    boot = get_json(hub.url + "/mesh/self")["addresses"]["libp2p"][0]
    holder = node_factory("rec-holder", "--threads", "1", "--ctx-size", "2048", "--advert-ttl-s", str(HOLDER_TTL_S),
                          *common, "--bootstrap", boot)
    time.sleep(PUT_S)
    reader = node_factory("rec-reader", "--no-model", *common, "--bootstrap", boot)
    holder_id = node_id(holder.url)
    time.sleep(QUIET_S)
    # without the lookup the reader never learns of the holder: no gossip flood, no dial of every peer
    assert holder_id not in peer_ids(reader.url)
    assert [m["id"] for m in get_json(reader.url + "/v1/models")["data"]] == []

    t0 = time.monotonic()
    status, headers, answer = chat(reader.url, MODEL)
    took_s = time.monotonic() - t0
    assert status == 200, answer
    assert headers.get("X-Meshllm-Node") == "rec-holder"
    assert answer["choices"][0]["message"]["content"]
    assert holder_id in peer_ids(reader.url)
    dialed = time.monotonic()

    # a model no one holds is a 404 after the bounded lookup; it runs while the holder's beats must keep
    # it known (its lookup finds no provider, so it dials no one and brings no advert)
    status, _, error = chat(reader.url, "no-such-model")
    missing_s = time.monotonic() - dialed
    assert status == 404, error
    assert "DHT" in error["error"]["message"]
    assert LOOKUP_WAIT_S - 1 <= missing_s <= LOOKUP_WAIT_S + 5
    # dialed by the lookup, the holder stays in the reader's table on its beats (past its ttl)
    time.sleep(max(0.0, HOLDER_TTL_S + 2.0 - (time.monotonic() - dialed)))
    assert holder_id in peer_ids(reader.url)
    status, _, _ = chat(reader.url, MODEL)
    assert status == 200
    print(f"first chat through the DHT lookup {took_s:.2f} s; a missing model answered 404 in {missing_s:.2f} s")
    wait_for(lambda: holder_id in peer_ids(reader.url), 1.0, "the holder is still known")
