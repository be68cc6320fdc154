"""`meshllm status` as a user runs it, against a real 3-node mesh: one of them with a hostile name."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import REPO

MODEL = "smollm2-135m-instruct"
HOSTILE = "E\x1b]0;pwned\x07\u202e"  # a terminal title escape and a bidi override


def status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", "status", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=60, env=dict(os.environ))


@pytest.fixture(scope="module")
def mesh(module_node_factory):
    secret = "status-" + secrets.token_hex(4)
    # started together: their start-ups overlap (conftest.spawn_nodes)
    started = module_node_factory.many({"B": ("--threads", "1", "--mesh-secret", secret),
                                        "A": ("--no-model", "--mesh-secret", secret),
                                        HOSTILE: ("--no-model", "--mesh-secret", secret)})
    a, b, e = started["A"], started["B"], started[HOSTILE]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with urllib.request.urlopen(a.url + "/mesh/peers", timeout=10) as resp:
            if len(json.loads(resp.read())) == 2:
                break
        time.sleep(0.2)
    return {"A": a, "B": b, "E": e}


def test_status_shows_the_node_its_peers_and_routes(mesh):
    done = status("--url", mesh["A"].url)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("node     A (")
    assert "serves   none" in out and "loading  nothing" in out
    assert "peers (2)" in out and "\nB " in out
    assert f"  {MODEL}: held whole by B" in out


def test_status_prints_no_escape_sequence_from_a_peer(mesh):
    done = status("--url", mesh["A"].url)
    assert done.returncode == 0
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout and "\u202e" not in done.stdout
    assert "E?]0;pwned??" in done.stdout  # one '?' per control character: columns stay aligned


def test_status_of_a_holder_shows_recent_speed(mesh):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 16, "temperature": 0}
    req = urllib.request.Request(mesh["B"].url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=60).read()
    done = status("--url", mesh["B"].url)
    assert done.returncode == 0, done.stderr
    assert f"serves   {MODEL}" in done.stdout
    line = next(x for x in done.stdout.splitlines() if x.startswith(f"  {MODEL}:"))
    assert "recent: " in line and " tok/s, TTFT " in line


def test_status_json_and_errors(mesh):
    done = status("--url", mesh["A"].url, "--json")
    assert done.returncode == 0
    shown = json.loads(done.stdout)
    assert shown["self"]["name"] == "A" and len(shown["peers"]) == 2 and shown["models"][0]["id"] == MODEL
    down = status("--url", "http://127.0.0.1:9")
    assert down.returncode == 1 and "cannot read" in down.stderr
