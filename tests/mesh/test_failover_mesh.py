"""Pipeline failover with real node processes (issue 14): a 3-stage chain with a spare holder of every
range, driven through the OpenAI API at a node holding no layers. A stage is killed (SIGKILL) or hung
(SIGSTOP) mid-stream or before the first token; the stream must complete with the token ids of a run
without the fault (greedy and seeded), a hung stage must cost under 3 s, every surviving stage must
free its session, and a stage that comes back must serve the next request."""

from __future__ import annotations

import signal
import time

import pytest

from tests.mesh.failover_helpers import MODEL, PROMPT, Mesh, run_stream

# 32 tokens: 8 before the fault, 24 after it on the replacement (the reference must reach 24)
GREEDY = {"model": MODEL, "prompt": PROMPT, "temperature": 0, "max_tokens": 32, "return_token_ids": True}
SEEDED = {**GREEDY, "temperature": 0.8, "top_p": 0.95, "seed": 1234}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    m = Mesh.pipeline(lambda name: tmp_path_factory.mktemp(name))
    try:
        greedy, _ = run_stream(m.gateway.url, GREEDY)
        seeded, _ = run_stream(m.gateway.url, SEEDED)
        assert greedy.error is None and len(greedy.ids) >= 24 and seeded.error is None and len(seeded.ids) >= 24
        assert len(m.chain(greedy.served_by)) == 3
        m.reference = {"greedy": greedy, "seeded": seeded}
        yield m
    finally:
        m.stop()


def test_a_stage_hung_before_the_first_token_costs_one_detection(mesh):
    """Runs first: the chain of a fault-free run is the one the gateway picks; its middle stage hangs."""
    ref = mesh.reference["greedy"]
    hung = mesh.nodes[mesh.chain(ref.served_by)[1]]
    hung.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        got, _ = run_stream(mesh.gateway.url, GREEDY)
        first_token_s = got.times[0] - started
    finally:
        hung.proc.send_signal(signal.SIGCONT)
    assert got.error is None and got.ids == ref.ids
    assert hung.name not in mesh.chain(got.served_by)
    assert first_token_s < 3.5
    mesh.wait_sessions_freed()


CASES = [(pos, sig, kind) for pos in (0, 1, 2) for sig in ("KILL", "STOP") for kind in ("greedy",)] + [
    (1, "KILL", "seeded"), (2, "STOP", "seeded")]


@pytest.mark.parametrize(("position", "sig", "kind"), CASES, ids=[f"stage{p}-{s}-{k}" for p, s, k in CASES])
def test_a_stage_failing_mid_stream_is_replaced_token_for_token(mesh, position, sig, kind):
    ref = mesh.reference[kind]
    body = GREEDY if kind == "greedy" else SEEDED
    victim: list[str] = []

    def fault(record) -> None:
        name = mesh.chain(record.served_by)[position]
        victim.append(name)
        mesh.nodes[name].proc.send_signal(signal.SIGKILL if sig == "KILL" else signal.SIGSTOP)

    try:
        got, fault_at = run_stream(mesh.gateway.url, body, fault=fault)
    finally:
        if victim and sig == "STOP":
            mesh.nodes[victim[0]].proc.send_signal(signal.SIGCONT)
    assert victim and fault_at is not None
    assert got.error is None, got.error["message"]
    assert got.ids == ref.ids and got.finish == ref.finish
    stall_s = got.max_gap_s(after=fault_at - 0.5)
    assert stall_s < (3.0 if sig == "STOP" else 2.0), f"stalled {stall_s:.2f} s"
    if sig == "KILL":
        mesh.restart(victim[0])
    mesh.wait_sessions_freed()
    after, _ = run_stream(mesh.gateway.url, GREEDY)  # the mesh serves the next request
    assert after.status == 200 and after.error is None and after.ids == mesh.reference["greedy"].ids


def test_no_spare_ends_with_an_error_naming_the_stage_then_serves_after_a_restart(mesh):
    """Runs last: both holders of the last range die mid-stream."""
    ref = mesh.reference["greedy"]
    dead: list[str] = []

    def fault(record) -> None:
        used = mesh.chain(record.served_by)[2]
        spare = next(n for n in ("C1", "C2") if n != used)
        for name in (spare, used):
            mesh.nodes[name].proc.send_signal(signal.SIGKILL)
            dead.append(name)

    got, fault_at = run_stream(mesh.gateway.url, GREEDY, fault=fault)
    ended = time.monotonic()
    assert fault_at is not None and got.error is not None
    assert ended - fault_at < 5.0, f"the error took {ended - fault_at:.2f} s"
    message = got.error["message"]
    assert "pipeline stage 2" in message and "layers [17, 30)" in message and "no replacement" in message, message
    mesh.wait_sessions_freed()
    for name in dead:
        mesh.restart(name)
    after, _ = run_stream(mesh.gateway.url, GREEDY)
    assert after.status == 200 and after.error is None and after.ids == ref.ids
    mesh.wait_sessions_freed()
