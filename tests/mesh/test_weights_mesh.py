"""Weights travel between peers (issue 13), with real node processes on loopback.

One node has the GGUF; two nodes with budgets and empty data dirs serve it with it as a 3-stage
pipeline, each fetching only its range's bytes; restarted, they serve from their caches with zero bytes
fetched. Whole pulls from two sources survive a killed source and a corrupting one (the test-only
fault `MESHLLM_FAULT_WEIGHTS`), and `meshllm pull` gives a file whose sha256 is the original's.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, model_file, stop_all

from shard.manifest import build_manifest, range_pieces

MODEL = "smollm2-135m-instruct"
SMOL = model_file(MODEL)
BUDGET = str(80_000_000)  # with one KV slot, SmolLM2 (146 MB whole, 176 MB over two) needs three such nodes
STAGE = ("--kv-sessions", "1", "--threads", "1")
GREEDY = {"model": MODEL, "messages": [{"role": "user", "content": "Write a short poem about the moon."}],
          "temperature": 0, "max_tokens": 24, "return_token_ids": True}


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def post(url: str, path: str, body: dict) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def wait_peers(url: str, n: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while len(get_json(url + "/mesh/peers")) < n:
        assert time.monotonic() < deadline, f"{url} sees fewer than {n} peers"
        time.sleep(0.2)


def weights(node) -> dict:
    return get_json(node.url + "/mesh/self")["weights"]


def fault(kind: str) -> dict[str, str]:
    """The environment of a source with the test-only fault `kind` in the weights it serves."""
    return {"MESHLLM_FAULT_WEIGHTS": kind}


# A slow source sleeps this long before each 1 MiB piece: a whole pull from one takes ~5 s, so the kills
# below (after 8 MB and 48 MB of the 146) land mid-transfer with most of the file still to come.
SLOW = "slow:0.05"


@pytest.fixture(scope="module")
def manifest():
    return build_manifest(SMOL.path, SMOL.digest, MODEL)


def test_one_holder_two_empty_nodes_serve_a_pipeline_then_restart_from_cache(node_factory, tmp_path, manifest):
    secret = "w-" + secrets.token_hex(4)
    mesh = ("--mesh-secret", secret)
    roles = {"G": ("--no-model", *mesh), "H": ("--offer", MODEL, "--memory-budget", BUDGET, *STAGE, *mesh),
             **{f"E{i}": ("--no-model", "--memory-budget", BUDGET, *STAGE, *mesh) for i in (1, 2)}}
    # the reference, a torch whole model, is alone in a mesh of its own
    nodes = node_factory.many({"W": ("--engine", "torch", "--model", MODEL, "--threads", "1",
                                     "--mesh-secret", "ref-" + secret), **roles})
    _, _, reference = post(nodes["W"].url, "/v1/chat/completions", GREEDY)
    ref_ids = reference["choices"][0]["token_ids"]

    gateway, holder, empties = nodes["G"], nodes["H"], [nodes["E1"], nodes["E2"]]
    wait_peers(gateway.url, 3)

    t0 = time.monotonic()
    status, headers, body = post(gateway.url, "/v1/chat/completions", GREEDY)
    print(f"cold: first answer in {time.monotonic() - t0:.1f} s")
    assert status == 200, body
    assert sorted(headers["X-Meshllm-Node"].split("+")) == ["E1", "E2", "H"]
    assert body["choices"][0]["token_ids"] == ref_ids  # the torch whole model's greedy ids

    served = 0
    for node in empties:
        me = get_json(node.url + "/mesh/self")
        (held,) = me["models"]
        need = sum(p.length for p in range_pieces(manifest, held["start"], held["end"], 30))
        assert me["weights"]["fetched_bytes"] == {SMOL.digest: need}  # exactly its range (+ header)
        assert need < manifest.file_size * 0.8
        served += need
        (cached,) = me["weights"]["cache"]
        assert cached["ranges"] == [[held["start"], held["end"]]] and not cached["complete"]
        files = [f for f in me["files"] if f["digest"] == SMOL.digest]
        assert files and files[0]["manifest"] == manifest.manifest_id  # a source in turn
    assert weights(holder)["served_bytes"] == served

    # Restart every node: the empty nodes load their cached ranges, fetching nothing.
    stop_all([gateway, holder, *empties])
    nodes = node_factory.many(roles, data_dirs={name: tmp_path / name for name in roles})
    gateway, holder, empties = nodes["G"], nodes["H"], [nodes["E1"], nodes["E2"]]
    wait_peers(gateway.url, 3)
    status, headers, again = post(gateway.url, "/v1/chat/completions", GREEDY)
    assert status == 200, again
    assert again["choices"][0]["token_ids"] == ref_ids
    for node in empties:
        w = weights(node)
        assert w["fetched_bytes"].get(SMOL.digest, 0) == 0 and w["last_fetch"][SMOL.digest]["bytes"] == 0
    assert weights(holder)["served_bytes"] == 0


def _pull(node, digest_or_alias: str, timeout_s: float = 120) -> dict:
    status, _, state = post(node.url, "/mesh/pull", {"model": digest_or_alias})
    assert status == 202, state
    deadline = time.monotonic() + timeout_s
    while state["state"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
        state = get_json(f"{node.url}/mesh/pull?model={state['digest']}")
    return state


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_a_killed_source_and_a_corrupting_one_are_routed_around(node_factory):
    secret = ("--mesh-secret", "w-" + secrets.token_hex(4))
    source = ("--offer", MODEL, "--memory-budget", BUDGET, *secret)
    nodes = node_factory.many({"S1": source, "L": source, "S2": source,
                               "R": ("--no-model", "--memory-budget", BUDGET, *secret)},
                              env={"S1": fault(SLOW), "L": fault("corrupt"), "S2": fault(SLOW)})
    slow, liar, good, receiver = nodes["S1"], nodes["L"], nodes["S2"], nodes["R"]
    wait_peers(receiver.url, 3)
    ids = {n.name: get_json(n.url + "/mesh/self")["node_id"] for n in (slow, liar, good)}

    status, _, state = post(receiver.url, "/mesh/pull", {"model": MODEL})
    assert status == 202
    deadline = time.monotonic() + 30
    while not (weights(receiver)["fetching"] and weights(receiver)["fetching"][0]["done_bytes"] > 8 << 20):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    slow.stop(signal.SIGKILL)  # mid-transfer
    state = _pull(receiver, SMOL.digest)
    assert state["state"] == "done", state
    assert _sha256(state["path"]) == SMOL.digest
    w = weights(receiver)
    assert w["rejected"].get("bad_piece", 0) >= 1 and w["rejected"].get("source_failed", 0) >= 1
    by_source = state["bytes_by_source"]
    assert ids["L"] not in by_source and by_source.get(ids["S2"], 0) > 0
    assert sum(by_source.values()) == w["fetched_bytes"][SMOL.digest]


def test_meshllm_pull_from_two_sources_gives_the_original_file(node_factory, tmp_path):
    secret = ("--mesh-secret", "w-" + secrets.token_hex(4))
    nodes = node_factory.many({"A": ("--offer", MODEL, "--memory-budget", BUDGET, *secret),
                               "B": ("--offer", MODEL, "--memory-budget", BUDGET, *secret),
                               "R": ("--no-model", *secret)})
    a, b, receiver = nodes["A"], nodes["B"], nodes["R"]
    wait_peers(receiver.url, 2)
    out = tmp_path / "elsewhere"
    done = subprocess.run([sys.executable, "-m", "node.cli", "pull", MODEL, "--url", receiver.url, "--data-dir", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert done.returncode == 0, done.stderr
    assert "2 source(s)" in done.stdout
    path = out / "weights" / f"{SMOL.digest}.gguf"
    assert _sha256(str(path)) == SMOL.digest
    state = weights(receiver)
    assert len(state["last_fetch"][SMOL.digest]["sources"]) == 2
    listed = subprocess.run([sys.executable, "-m", "node.cli", "models", "--data-dir", str(out), "--json"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    (row,) = json.loads(listed.stdout)
    assert row["alias"] == MODEL and row["complete"] and row["digest"] == SMOL.digest
    # a pulled node is a whole source now
    deadline = time.monotonic() + 20
    while not (files := [f for f in get_json(receiver.url + "/mesh/self")["files"] if f["digest"] == SMOL.digest]):
        assert time.monotonic() < deadline, receiver.output
        time.sleep(0.2)
    assert "end" not in files[0] and files[0]["manifest"]
    del a, b


def test_fetch_tensors_for_a_model_not_held_is_not_found(node_factory):
    secret = ("--mesh-secret", "w-" + secrets.token_hex(4))
    receiver = node_factory("R", "--no-model", *secret)
    status, _, body = post(receiver.url, "/mesh/pull", {"model": "0" * 64})
    assert status == 404
    status, _, body = post(receiver.url, "/mesh/pull", {"model": "../../etc/passwd"})
    assert status == 400


def test_a_restarted_receiver_resumes_and_a_small_disk_budget_is_one_line(node_factory, tmp_path):
    secret = ("--mesh-secret", "w-" + secrets.token_hex(4))
    receiver = node_factory.many({"S": ("--offer", MODEL, "--memory-budget", BUDGET, *secret),
                                  "R": ("--no-model", *secret)}, env={"S": fault(SLOW)})["R"]
    wait_peers(receiver.url, 1)
    status, _, _ = post(receiver.url, "/mesh/pull", {"model": MODEL})
    assert status == 202
    deadline = time.monotonic() + 60
    while not (weights(receiver)["fetching"] and weights(receiver)["fetching"][0]["done_bytes"] > 48 << 20):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    receiver.stop(signal.SIGKILL)  # mid-transfer
    receiver = node_factory("R", "--no-model", *secret, data_dir=tmp_path / "R")
    wait_peers(receiver.url, 1)
    state = _pull(receiver, SMOL.digest)
    assert state["state"] == "done", state
    assert _sha256(state["path"]) == SMOL.digest
    assert 0 < state["bytes"] < SMOL.size_bytes - (30 << 20)  # what was verified before the kill stays

    small = node_factory("T", "--no-model", "--disk-budget", str(10 << 20), *secret)
    wait_peers(small.url, 2)
    state = _pull(small, SMOL.digest)
    assert state["state"] == "error" and "--disk-budget" in state["error"] and "\n" not in state["error"]
    assert not list((tmp_path / "T" / "weights").glob("*.gguf"))  # nothing partial left behind
