"""Real `meshllm node join --no-model` processes on loopback: mDNS membership, leaving, `meshllm peers`.

One 3-node mesh per module (unique secret, so nothing else on this machine can join it); the
leave test adds two more nodes and takes them away.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from conftest import REPO, NodeProc
from discovery_mesh_helpers import mesh_secret, node_id, peer_ids, peer_ids_strict, start_parallel, wait_for

MDNS_BOUND_S = 5.0
TTL_S = 10.0  # the node's default advert ttl
# the node that is SIGKILLed asks for a 4 s ttl (--advert-ttl-s): peers drop it on its own advert's
# ttl, so the bound it is held to is the same, 6 s sooner
KILL_TTL_S = 4.0
KILL_BOUND_S = KILL_TTL_S + 2.0
TERM_BOUND_S = 1.5


class Mesh:
    def __init__(self, make: Callable[..., NodeProc], secret: str, nodes: list[NodeProc], ready_at: float):
        self.make = make
        self.secret = secret
        self.nodes = nodes
        self.ready_at = ready_at  # when the last node printed its ready line
        self.ids = {n.name: node_id(n.url) for n in nodes}


@pytest.fixture(scope="module")
def mesh(module_node_factory: Callable[..., NodeProc], tmp_path_factory: pytest.TempPathFactory) -> Mesh:
    tmp_path_factory.getbasetemp()  # created once here: three threads creating it at once race
    secret = mesh_secret("lan")
    started = start_parallel(module_node_factory, [(f"lan{i}", "--no-model", "--mesh-secret", secret) for i in range(3)])
    return Mesh(module_node_factory, secret, [n for n, _ in started], max(t for _, t in started))


def test_three_nodes_see_each_other_through_mdns_within_5s(mesh: Mesh) -> None:
    everyone = set(mesh.ids.values())

    def complete() -> bool:
        return all(peer_ids(n.url) == everyone - {mesh.ids[n.name]} for n in mesh.nodes)

    while not complete():
        assert time.monotonic() - mesh.ready_at <= MDNS_BOUND_S, "3 nodes did not see each other within 5 s"
        time.sleep(0.1)
    for n in mesh.nodes:
        rows = _peers_json(n.url)
        assert {r["source"] for r in rows} == {"mdns"}
        for r in rows:
            assert set(r) >= {"node_id", "name", "models", "resources", "load", "addresses", "last_seen_s"}
            assert r["addresses"]["http"].startswith("127.0.0.1:") and r["addresses"]["grpc"]
            assert r["models"] == [] and r["last_seen_s"] < TTL_S


def test_peers_command_prints_a_table_and_json(mesh: Mesh) -> None:
    a, b, c = mesh.nodes
    wait_for(lambda: len(peer_ids(a.url)) == 2, 10.0, "node a sees its two peers")
    table = _meshllm("peers", "--url", a.url)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["NAME", "NODE", "MODELS"]
    assert {line.split()[0] for line in lines[1:]} == {b.name, c.name}
    assert mesh.ids[b.name][:12] in table and a.name not in table
    rows = json.loads(_meshllm("peers", "--json", "--url", a.url))
    assert {r["name"] for r in rows} == {b.name, c.name}
    assert {r["node_id"] for r in rows} == {mesh.ids[b.name], mesh.ids[c.name]}


def test_sigkill_leaves_within_ttl_and_sigterm_at_once(mesh: Mesh) -> None:
    args = ("--no-model", "--mesh-secret", mesh.secret)
    (killed, _), (termed, _) = start_parallel(mesh.make, [("lan-kill", *args, "--advert-ttl-s", str(KILL_TTL_S)),
                                                          ("lan-term", *args)])
    killed_id, termed_id = node_id(killed.url), node_id(termed.url)
    wait_for(
        lambda: all({killed_id, termed_id} <= peer_ids(n.url) for n in mesh.nodes),
        30.0,
        "the two newcomers appear everywhere",
    )
    t0 = time.monotonic()
    killed.proc.send_signal(signal.SIGKILL)
    termed.proc.send_signal(signal.SIGTERM)
    left: dict[str, float] = {}
    while len(left) < 2 and time.monotonic() - t0 < KILL_BOUND_S + 10:
        tables = [peer_ids_strict(n.url) for n in mesh.nodes]
        now = time.monotonic() - t0
        for gone in (killed_id, termed_id):
            if gone not in left and all(t is not None and gone not in t for t in tables):
                left[gone] = now
        time.sleep(0.1)
    assert termed_id in left and left[termed_id] <= TERM_BOUND_S, f"SIGTERM: left after {left.get(termed_id)} s"
    assert killed_id in left and left[killed_id] <= KILL_BOUND_S, f"SIGKILL: left after {left.get(killed_id)} s"
    assert termed.proc.wait(timeout=20) == 0
    print(f"SIGTERM left every table in {left[termed_id]:.3f} s, SIGKILL in {left[killed_id]:.2f} s")


def _peers_json(url: str) -> list[dict]:
    return json.loads(_meshllm("peers", "--json", "--url", url))


def _meshllm(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "node.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout
