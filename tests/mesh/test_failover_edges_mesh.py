"""Pipeline failover edges with real node processes (issue 14): a 2-stage chain (A1 holds [0, 15), three
nodes hold [15, 30)) driven through the OpenAI API at a node holding no layers.

- the replacement chain fails during its own re-prefill (the replay of the ids already sent): a third
  chain completes the stream with the fault-free ids;
- a client that hangs up while its stream fails over: every stage frees its session;
- restarted nodes serve the very next request (200): their servers refuse members they have not heard
  of yet, and callers' fresh channels redial until they have (channels.FRESH_CONNECT_S).
"""

from __future__ import annotations

import signal
import threading
import time

import pytest

from tests.mesh.failover_helpers import (
    MODEL,
    PROMPT,
    Mesh,
    active,
    knows,
    open_stream,
    restart,
    run_stream,
    wait_until,
)

GREEDY = {"model": MODEL, "prompt": PROMPT, "temperature": 0, "max_tokens": 32, "return_token_ids": True}
BS = ("B1", "B2", "B3")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    holders = {"A1": ("--shard", f"{MODEL}:0-15", "--threads", "1"),
               **{b: ("--shard", f"{MODEL}:15-30", "--threads", "1") for b in BS}}
    m = Mesh(lambda name: tmp_path_factory.mktemp(name), holders)
    try:
        greedy, _ = run_stream(m.gateway.url, GREEDY)
        assert greedy.error is None and len(greedy.ids) >= 24, greedy.error
        m.reference = {"greedy": greedy}
        yield m
    finally:
        m.stop()


def _replacement(mesh: Mesh, skip: set[str], timeout_s: float = 10) -> str:
    """The B node that opens a session next (the replacement chain's stage 1), polled at once."""
    found: list[str] = []

    def opened() -> bool:
        for name in BS:
            node = mesh.nodes[name]
            if name not in skip and node.proc.poll() is None and active(node) > 0:
                found.append(name)
                return True
        return False

    wait_until(opened, timeout_s, "a replacement stage opening its session", every_s=0.01)
    return found[0]


def test_a_fault_during_the_replacements_re_prefill_moves_on_to_a_third_chain(mesh):
    ref = mesh.reference["greedy"]
    record, events = open_stream(mesh.gateway.url, GREEDY)
    reader = threading.Thread(target=lambda: [None for _ in events], daemon=True)
    reader.start()
    wait_until(lambda: len(record.ids) >= 16, 60, "16 tokens")
    first = mesh.chain(record.served_by)[1]
    mesh.nodes[first].proc.send_signal(signal.SIGKILL)
    at_first = len(record.ids)
    second = _replacement(mesh, {first})
    mesh.nodes[second].proc.send_signal(signal.SIGKILL)  # it is replaying the ids already sent
    at_second = len(record.ids)
    reader.join(120)
    assert at_second <= at_first + 1, f"the replacement had sent {at_second - at_first} new tokens: not re-prefilling"
    assert record.error is None, record.error
    assert record.ids == ref.ids and record.finish == ref.finish
    mesh.wait_sessions_freed()
    mesh.restart(first)  # the next test needs a spare


def test_a_client_hanging_up_mid_failover_frees_every_session(mesh):
    record, events = open_stream(mesh.gateway.url, GREEDY)
    for _ in events:
        if len(record.ids) >= 8:
            break
    victim = mesh.chain(record.served_by)[1]
    mesh.nodes[victim].proc.send_signal(signal.SIGSTOP)  # hung: detected by its missed step deadline
    try:
        _replacement(mesh, {victim})
        events.close()  # the client hangs up while the replacement re-prefills
    finally:
        mesh.nodes[victim].proc.send_signal(signal.SIGCONT)
    mesh.wait_sessions_freed(timeout_s=15)  # the hung one too, once it runs again
    after, _ = run_stream(mesh.gateway.url, GREEDY)
    assert after.status == 200 and after.ids == mesh.reference["greedy"].ids
    mesh.wait_sessions_freed()


def test_restarted_nodes_serve_the_very_next_request(mesh):
    """Every holder of both ranges dies, B1 and then A1 come back: the next request must go through
    them, the gateway calling a stage 0 that has not heard of it yet (the stage-to-stage case is
    test_failover_mesh's last test)."""
    for name in ("A1", *BS):
        mesh.nodes[name].proc.send_signal(signal.SIGKILL)
    mesh.restart("B1")
    since = time.time()
    restart(mesh.nodes["A1"], mesh.args["A1"])  # the gateway calls it once it knows it, not waiting more
    wait_until(lambda: knows(mesh.gateway, "A1", since), 30, "the gateway seeing A1 again", every_s=0.02)
    started = time.monotonic()
    after, _ = run_stream(mesh.gateway.url, GREEDY)
    assert after.status == 200 and after.error is None, after.error
    assert after.ids == mesh.reference["greedy"].ids
    assert time.monotonic() - started < 30
    mesh.wait_sessions_freed()
