"""Table-driven tests of the data plane's pure defences (issue 11): activation limits checked before
buffering (7, 9), chains by node id (6), the stage session book (8), silence deadlines (10) and the
LoadShard gate (15)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from core.errors import Busy, Refused
from dataplane.liveness import HUNG_FLOOR_S, Silence
from dataplane.load_gate import LoadGate
from dataplane.rpc import PayloadError
from dataplane.stage_sessions import IDLE_FLOOR_S, SessionBook, peer_host, per_peer_cap
from dataplane.stage_wire import decode_chain
from shard.activation_wire import (
    FRAME_BYTES,
    ActivationAssembler,
    ActivationError,
    ActivationLimits,
    encode_activation,
)

LIMITS = ActivationLimits(hidden_size=8, max_tokens=16)
NODE = "0123456789abcdef0123456789abcdef"


def frame(shape, dtype="float32", data=None, i=0, n=1, pos=0):
    size = 4 if dtype == "float32" else 2
    numel = 1
    for d in shape:
        numel *= d
    return {"pos": pos, "dtype": dtype, "shape": shape, "i": i, "n": n,
            "data": data if data is not None else b"\0" * (numel * size)}


BAD_FIRST_FRAMES = [
    ("wrong hidden size, right byte count", frame([1, 8], data=b"\0" * 32) | {"shape": [2, 4]}),
    ("the [1, 577] lie", frame([1, 577])),
    ("too many tokens", frame([17, 8])),
    ("no tokens", frame([0, 8])),
    ("token ids to a hidden-state stage", frame([8], dtype="int64", data=b"\0" * 64)),
    ("3-d", frame([1, 1, 8])),
    ("1 GiB announced", frame([1 << 20, 256], data=b"\0" * 16)),
    ("bytes short of the shape", frame([1, 8], data=b"\0" * 31)),
    ("frame count that does not match", frame([1, 8]) | {"n": 3}),
]


@pytest.mark.parametrize(("name", "bad"), BAD_FIRST_FRAMES, ids=[c[0] for c in BAD_FIRST_FRAMES])
def test_lying_shapes_are_refused_on_the_first_frame(name, bad):
    assembler = ActivationAssembler(LIMITS)
    with pytest.raises(ActivationError):
        assembler.add(bad)
    assert assembler._buf is None or len(assembler._buf) <= 16 * 8 * 4  # nothing beyond what the stage allows


def test_a_good_tensor_round_trips_through_frames_into_one_buffer():
    big = ActivationLimits(hidden_size=1024, max_tokens=512)
    x = torch.randn(300, 1024)  # 1.2 MB: two frames
    frames = encode_activation(x, 5)
    assert len(frames) == 2
    assembler = ActivationAssembler(big)
    assert assembler.add(frames[0]) is None and assembler.in_progress
    pos, y = assembler.add(frames[1])
    assert pos == 5 and torch.equal(x, y) and not assembler.in_progress
    for dtype in (torch.bfloat16, torch.float16):
        pos, y = ActivationAssembler(big).add(encode_activation(x[:2].to(dtype), 0)[0])
        assert y.dtype == dtype and torch.equal(y, x[:2].to(dtype))


def test_frames_beyond_the_announced_size_are_refused():
    assembler = ActivationAssembler(ActivationLimits(hidden_size=1024, max_tokens=512))
    first = encode_activation(torch.zeros(300, 1024), 0)[0]
    assembler.add(first)
    with pytest.raises(ActivationError):
        assembler.add({**first, "i": 1, "data": b"\0" * FRAME_BYTES})  # the last frame is shorter


CHAINS = [
    ("an address instead of a node id", [["127.0.0.1:22", 0, 10]]),
    ("a host name", [["internal.example:443", 0, 10]]),
    ("empty range", [[NODE, 5, 5]]),
    ("not a list", "x"),
]


@pytest.mark.parametrize(("name", "chain"), CHAINS, ids=[c[0] for c in CHAINS])
def test_chains_name_node_ids_only(name, chain):
    with pytest.raises(PayloadError):
        decode_chain(chain)


def test_a_chain_of_node_ids_decodes():
    assert [h.node for h in decode_chain([[NODE, 0, 10], [NODE, 10, 30]])] == [NODE, NODE]


PEERS = [("ipv4:10.0.0.2:5555", "10.0.0.2"), ("ipv6:[::1]:5555", "::1"), ("unix:/tmp/s", "unix:/tmp/s")]


@pytest.mark.parametrize(("peer", "host"), PEERS)
def test_peer_host(peer, host):
    assert peer_host(peer) == host


@pytest.mark.parametrize(("slots", "cap"), [(1, 1), (2, 1), (4, 3), (8, 6), (16, 12)])
def test_per_peer_cap_leaves_others_a_share(slots, cap):
    assert per_peer_cap(slots) == cap


def test_one_peer_cannot_hold_every_session():
    book = SessionBook(per_peer_cap(8), clock=lambda: 0.0)
    for i in range(6):
        book.open(f"s{i}", "attacker")
    with pytest.raises(Busy):
        book.open("s6", "attacker")
    book.open("real", "someone else")
    book.close("s0")
    book.open("s6", "attacker")  # a freed share is usable again
    for i in range(8):  # one machine's processes: no host to tell them apart by
        book.open(f"l{i}", "127.0.0.1")


def test_idle_deadline_follows_the_step_cadence():
    now = [0.0]
    book = SessionBook(4, clock=lambda: now[0])
    book.open("s", "p")
    for _ in range(10):  # a step every 50 ms
        book.step("s")
        now[0] += 0.05
    assert book.idle_timeout_s("s") == IDLE_FLOOR_S
    slow = SessionBook(4, clock=lambda: now[0])
    slow.open("t", "p")
    for _ in range(10):  # a step every second: 20 s
        slow.step("t")
        now[0] += 1.0
    assert slow.idle_timeout_s("t") == pytest.approx(20.0)


def test_silence_deadline_has_a_floor_and_grows_with_measured_gaps():
    now = [0.0]
    s = Silence(clock=lambda: now[0])
    s.start()
    assert s.deadline_s() == HUNG_FLOOR_S
    for _ in range(3):
        now[0] += 0.5
        s.heard()
    assert s.deadline_s() == HUNG_FLOOR_S
    for _ in range(20):  # a slow peer: 4 s between frames
        now[0] += 4.0
        s.heard()
    assert s.deadline_s() == pytest.approx(16.0, rel=0.01)


def test_load_gate_caps_each_peer_and_the_ranges_loaded():
    now = [0.0]
    gate = LoadGate(per_peer=2, window_s=60.0, max_ranges=3, clock=lambda: now[0])

    async def load(peer, start):
        async with gate.admit(peer, "d" * 64, start, start + 1):
            pass

    asyncio.run(load("a", 0))
    asyncio.run(load("a", 0))  # the same range again: free
    asyncio.run(load("a", 1))
    with pytest.raises(Busy):
        asyncio.run(load("a", 2))
    asyncio.run(load("b", 2))
    with pytest.raises(Refused):
        asyncio.run(load("b", 3))
    now[0] += 61.0
    with pytest.raises(Refused):  # the window passed, the cap on ranges did not
        asyncio.run(load("a", 4))


def test_a_stage_whose_kv_pool_is_spent_answers_busy_not_bad_request(tmp_path):
    """A step that finds the KV pool full (other sessions hold every block) is the mesh's load, not
    the caller's fault: RESOURCE_EXHAUSTED with a retry-after, so the gateway says 429, not 400."""
    from dataplane.stage import PipelineService
    from engine.model_file import load_model_file
    from engine.torch_engine import TorchShardEngine
    from scripts.synthetic_gguf import write_synthetic_llama
    from shard.spec import ShardSpec

    path = write_synthetic_llama(tmp_path / "tiny.gguf", "tiny-512", "Q4_0")
    model = load_model_file(str(path))
    engine = TorchShardEngine(model, spec=ShardSpec(model.digest, 0, 2, 4), max_sessions=2, max_context=64,
                              kv_tokens=64)
    service = PipelineService(None, None, "token")  # type: ignore[arg-type]
    try:
        engine.open_session("a")
        engine.open_session("b")
        engine.forward_stage(["a"], [torch.arange(40)], [0])  # both blocks of the pool
        with pytest.raises(Busy, match="KV cache full"):
            asyncio.run(service._run(engine, "b", torch.arange(8), 0))
    finally:
        engine.close()
