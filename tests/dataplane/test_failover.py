"""Table-driven tests of the pipeline failover decisions (blame, replacement chain), the step
deadline, the resumed-stream wire fields and the last stage's replay."""

from __future__ import annotations

import pytest
import torch

from core.errors import BadRequest
from core.types import Chunk, FinishReason, SamplingParams
from dataplane import rpc
from dataplane.liveness import HUNG_FLOOR_S, Silence, p95, step_deadline_s
from dataplane.replay import Replay, forced_logits
from dataplane.routing.failover import blame, describe, recently_failed, replacement_route, replica_route
from dataplane.rpc import PayloadError
from dataplane.stage_wire import Header, decode_header, decode_resume
from placement.choose_holder import FailureRecord
from placement.cluster import Stage
from placement.route_pipeline import PipelineRoute
from tests.dataplane.routing_builders import M, node

A, B, C, D = ("a" * 32, "b" * 32, "c" * 32, "d" * 32)
CHAIN = (Stage(A, 0, 5), Stage(B, 5, 17), Stage(C, 17, 30))

BLAME = [
    ("a middle stage named", "UNAVAILABLE: next stage bbbbbbbb went silent for 2.0 s", 1, "went silent for 2.0 s"),
    ("the last stage named", "next stage cccccccc failed (UNAVAILABLE)", 2, "failed (UNAVAILABLE)"),
    ("stage 0 silent", "no frame from aaaaaaaa for 2.0 s", 0, "no frame from aaaaaaaa for 2.0 s"),
    ("stage 0 unreachable", "UNAVAILABLE: failed to connect to all addresses", 0, "UNAVAILABLE: failed to connect to all addresses"),
    ("a node not in the chain is not blamed", "next stage dddddddd failed (UNAVAILABLE)", 0, "next stage dddddddd failed (UNAVAILABLE)"),
    ("stage 0 cannot name itself as next", "next stage aaaaaaaa failed", 0, "next stage aaaaaaaa failed"),
]


@pytest.mark.parametrize(("name", "message", "index", "why"), BLAME, ids=[b[0] for b in BLAME])
def test_blame(name, message, index, why):
    failure = blame(CHAIN, message)
    assert (failure.index, failure.stage, failure.why) == (index, CHAIN[index], why)


def test_describe_names_the_stage_and_its_layers():
    text = describe(blame(CHAIN, "next stage bbbbbbbb went silent for 2.0 s"), {B: "T2"})
    assert text == "pipeline stage 1 (T2, layers [5, 17)) failed: went silent for 2.0 s"


DIGEST = "e" * 64


def nodes():
    return [node(A, digest=DIGEST, start=0, end=5), node(B, digest=DIGEST, start=5, end=17), node(C, digest=DIGEST, start=17, end=30),
            node(D, digest=DIGEST, start=5, end=17)]


ROUTES = [
    ("a spare holder of the failed range", frozenset({B}), frozenset(), (A, D, C)),
    ("no spare: no chain", frozenset({A}), frozenset(), None),
    ("the avoided node is kept when no chain exists without it", frozenset({B}), frozenset({D}), (A, D, C)),
    ("a recently failed node is avoided when another chain exists", frozenset(), frozenset({B}), (A, D, C)),
    ("both holders of a range gone", frozenset({B, D}), frozenset(), None),
]


@pytest.mark.parametrize(("name", "exclude", "avoid", "expected"), ROUTES, ids=[r[0] for r in ROUTES])
def test_replacement_route(name, exclude, avoid, expected):
    route = replacement_route(DIGEST, nodes(), exclude, avoid)
    assert (None if route is None else tuple(s.node for s in route.stages)) == expected


def test_recently_failed_forgets_old_failures():
    failures = {A: FailureRecord(1, 100.0), B: FailureRecord(2, 80.0)}
    assert recently_failed(failures, 105.0, within_s=15.0) == frozenset({A})
    assert recently_failed(failures, 200.0, within_s=15.0) == frozenset()


DEADLINES = [
    ("no gaps yet: the floor", [], HUNG_FLOOR_S),
    ("heartbeats every 0.5 s: the floor", [0.5] * 50, HUNG_FLOOR_S),
    ("slow steps: 4 x p95", [1.0] * 95 + [2.0] * 5, 4.0),
    ("one outlier does not move the p95", [0.1] * 99 + [30.0], HUNG_FLOOR_S),
    ("a ceiling", [100.0] * 10, 60.0),
]


@pytest.mark.parametrize(("name", "gaps", "expected"), DEADLINES, ids=[d[0] for d in DEADLINES])
def test_step_deadline(name, gaps, expected):
    assert step_deadline_s(gaps) == pytest.approx(expected)


def test_p95_and_the_window_of_recent_gaps():
    assert p95([]) == 0.0 and p95([3.0]) == 3.0 and p95(list(range(1, 101))) == 95
    now = [0.0]
    s = Silence(clock=lambda: now[0])
    s.start()
    for _ in range(100):  # slow at first, then steady at 0.1 s: only the recent window counts
        now[0] += 5.0 if len(s.gaps) < 10 else 0.1
        s.heard()
    assert s.deadline_s() == HUNG_FLOOR_S
    assert HUNG_FLOOR_S < 3.0  # a hung stage is declared failed within 3 s (issue 14)


def wire(header: Header) -> dict:
    return rpc.unpack(rpc.pack({"h": header.encode()}))


def test_resume_ids_on_the_wire():
    header = Header("s", DIGEST, [Stage(B, 5, 17), Stage(C, 17, 30)], SamplingParams(seed=3), 10, 64, (5, 6, 7))
    assert decode_header(wire(header)) == header
    assert decode_header(wire(header.onward())).resume == (5, 6, 7)
    fresh = Header("s", DIGEST, [Stage(B, 5, 30)], SamplingParams(), 10, 64)
    assert "resume" not in fresh.encode() and decode_header(wire(fresh)).resume == ()
    for bad in ("x", [1, -1], [1.0], [True], [1 << 30], [0] * ((1 << 16) + 1)):
        with pytest.raises(PayloadError):
            decode_resume(bad)
    with pytest.raises(PayloadError, match="every token"):
        decode_header(wire(Header("s", DIGEST, [Stage(B, 5, 30)], SamplingParams(), 10, 3, (1, 2, 3))))


def test_forced_logits_allow_one_token_and_check_the_vocabulary():
    like = torch.zeros(1, 10)
    forced = forced_logits(like, 4)
    assert forced.argmax().item() == 4 and torch.isinf(forced).sum() == 9
    with pytest.raises(BadRequest):
        forced_logits(like, 10)


def test_replay_checks_each_id_and_refuses_one_that_ends_the_stream():
    replay = Replay([3, 1])
    seen = []
    while replay.active:
        token = int(replay.logits(torch.zeros(1, 10)).argmax())
        seen.append(token)
        replay.check(Chunk(token_ids=[token]), token)
    assert seen == [3, 1]
    with pytest.raises(BadRequest):
        Replay([2]).check(Chunk(), 5)
    with pytest.raises(BadRequest):
        Replay([2]).check(Chunk(finish_reason=FinishReason.STOP), 2)


def test_seeded_draws_continue_after_a_replay():
    """The sampler's own chain (engine/sampling.py): a replayed run draws what an unbroken one does."""
    from engine.sampling import SamplerState, sample

    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=11, frequency_penalty=0.5)
    logits = torch.randn(8, 1, 300, generator=torch.Generator().manual_seed(1))
    unbroken = SamplerState(params)
    want = [sample([unbroken], logits[i])[0] for i in range(8)]
    resumed, replay = SamplerState(params), Replay(want[:5])
    while replay.active:
        token = sample([resumed], replay.logits(logits[replay.done]))[0]
        replay.check(Chunk(token_ids=[token]), token)
    assert [sample([resumed], logits[i])[0] for i in range(5, 8)] == want[5:]


# --replicas: two placed chains A+B and C+D of [0, 15) + [15, 30)
REPLICAS = (PipelineRoute((Stage(A, 0, 15), Stage(B, 15, 30)), 10.0),
            PipelineRoute((Stage(C, 0, 15), Stage(D, 15, 30)), 12.0))
HELD = [node(A, end=15), node(B, start=15), node(C, end=15), node(D, start=15)]


@pytest.mark.parametrize(("name", "adverts", "skip", "streams", "want"), [
    ("idle: the cheaper chain", HELD, set(), {}, 0),
    ("a burst spreads: the other chain once ours has a stream", HELD, set(), {A: 1, B: 1}, 1),
    ("the least busy node decides", HELD, set(), {A: 2, B: 1, C: 2, D: 3}, 0),
    ("a failed node moves streams to the other chain", HELD, {B}, {C: 5, D: 5}, 1),
    ("a range no longer advertised rules its chain out", HELD[:3], set(), {A: 3, B: 3}, 0),
    ("both chains broken: none", HELD, {A, D}, {}, None),
])
def test_replica_route(name, adverts, skip, streams, want):
    route = replica_route(REPLICAS, M, adverts, frozenset(skip), streams)
    assert route == (REPLICAS[want] if want is not None else None), name
