"""LoopBatcher on the real SmolLM2 engine: a stage's decode steps batched on its event loop.

Steps of concurrent sessions run as one batch with the same bits as alone; a batch waits for its
group (the previous stage's batch size), not for every open session; a bad or cancelled step costs
only its own session; a step that finds a prompt chunk in flight runs off the loop, which keeps
serving meanwhile.
"""

import asyncio
import threading
import time

import pytest
import torch

from dataplane.stage_batcher import LoopBatcher
from engine.model_file import load_model_file
from engine.session_errors import SessionError
from engine.torch_engine import TorchShardEngine

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time there", "1, 2, 3,"]


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    e = TorchShardEngine(load_model_file("smollm2-135m-instruct"), max_sessions=6, max_context=512)
    yield e
    e.close()


@pytest.fixture
def sessions(engine):
    """Four sessions with their prompts cached; yields (session ids, next positions)."""
    sids = [f"lb{i}" for i in range(4)]
    pos = []
    for sid, prompt in zip(sids, PROMPTS, strict=True):
        ids = engine.tokenizer.encode(prompt)
        engine.open_session(sid)
        engine.prefill_stage(sid, torch.tensor(ids), 0)
        pos.append(len(ids))
    yield sids, pos
    for sid in sids:
        engine.close_session(sid)


def _x(i: int) -> torch.Tensor:
    return torch.tensor([11 + i])


def test_concurrent_steps_run_as_one_batch_with_the_bits_of_each_alone(engine, sessions) -> None:
    sids, pos = sessions

    async def main(b: LoopBatcher) -> list:
        return await asyncio.gather(*(b.step(s, _x(i), pos[i], group=4) for i, s in enumerate(sids)))

    b = LoopBatcher(engine, gather_s=5.0)
    together = asyncio.run(main(b))
    assert (b.batches, b.steps) == (1, 4)
    assert [size for _, _, size in together] == [4, 4, 4, 4]
    for i, s in enumerate(sids):  # the same positions again, one session at a time (a rewind)
        alone = engine.forward_stage([s], [_x(i)], [pos[i]])[0]
        assert torch.equal(alone, together[i][0]), s


def test_a_batch_waits_for_its_group_not_for_every_open_session(engine, sessions) -> None:
    """Four sessions are open; a group of 2 runs as soon as both steps are in, a group of 1 at once,
    though the gather time (5 s) would let a batch wait for all four."""
    sids, pos = sessions

    async def main(b: LoopBatcher) -> tuple[float, float]:
        async def late() -> tuple:
            await asyncio.sleep(0.05)
            return await b.step(sids[1], _x(1), pos[1], group=2)

        t0 = time.monotonic()
        pair = await asyncio.gather(b.step(sids[0], _x(0), pos[0], group=2), late())
        t1 = time.monotonic()
        assert [size for _, _, size in pair] == [2, 2]
        await b.step(sids[2], _x(2), pos[2], group=1)
        return t1 - t0, time.monotonic() - t1

    b = LoopBatcher(engine, gather_s=5.0)
    pair_s, single_s = asyncio.run(main(b))
    assert (b.batches, b.steps) == (2, 3)
    assert pair_s < 2.0 and single_s < 2.0


def test_without_a_group_a_batch_waits_up_to_the_gather_time(engine, sessions) -> None:
    """A step with no group (a session's first decode step, an older peer) waits, at most the
    gather time, for the steps of every open session."""
    sids, pos = sessions

    async def main(b: LoopBatcher) -> float:
        t0 = time.monotonic()
        _, _, size = await b.step(sids[0], _x(0), pos[0])
        assert size == 1
        return time.monotonic() - t0

    assert asyncio.run(main(LoopBatcher(engine, gather_s=0.3))) >= 0.3


def test_a_bad_step_fails_its_own_session_only(engine, sessions) -> None:
    sids, pos = sessions

    async def main(b: LoopBatcher) -> list:
        return await asyncio.gather(
            b.step(sids[0], _x(0), pos[0], group=2),
            b.step(sids[1], _x(1), pos[1] + 7, group=2),  # past its cached positions
            return_exceptions=True,
        )

    b = LoopBatcher(engine, gather_s=5.0)
    good, bad = asyncio.run(main(b))
    assert isinstance(bad, SessionError) and "do not follow" in str(bad)
    assert torch.equal(good[0], engine.forward_stage([sids[0]], [_x(0)], [pos[0]])[0])
    assert engine.session_length(sids[1]) == pos[1]  # unharmed: the step never ran


def test_a_cancelled_step_never_runs(engine, sessions) -> None:
    sids, pos = sessions

    async def main(b: LoopBatcher) -> None:
        task = asyncio.create_task(b.step(sids[0], _x(0), pos[0]))  # waits for the other sessions
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.3)  # past the gather time: nothing is left to run

    b = LoopBatcher(engine, gather_s=0.2)
    asyncio.run(main(b))
    assert (b.batches, b.steps) == (0, 0)
    assert engine.session_length(sids[0]) == pos[0]


def test_a_step_behind_a_prompt_chunk_runs_off_the_loop(engine, sessions) -> None:
    """While a worker thread prefills a long prompt (chunks of 128 positions, each far longer than a
    decode step), a decode step joins it on a thread: the loop keeps turning meanwhile."""
    sids, pos = sessions
    engine.open_session("long")
    try:
        long_ids = torch.arange(100, 100 + 400)
        chunk_started = threading.Event()
        prefill = threading.Thread(
            target=lambda: (chunk_started.set(), engine.prefill_stage("long", long_ids, 0))
        )

        async def main(b: LoopBatcher) -> tuple[float, torch.Tensor]:
            gaps, stop = [], asyncio.Event()

            async def tick() -> None:
                last = time.monotonic()
                while not stop.is_set():
                    await asyncio.sleep(0.005)
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

            ticker = asyncio.create_task(tick())
            out, _, _ = await b.step(sids[0], _x(0), pos[0], group=1)
            stop.set()
            await ticker
            return max(gaps), out

        prefill.start()
        chunk_started.wait()
        deadline = time.monotonic() + 30
        while engine.run_steps([], [], [], now=True) is not None:  # until a chunk is in flight
            assert time.monotonic() < deadline
            time.sleep(0.001)
        worst_gap, out = asyncio.run(main(LoopBatcher(engine, gather_s=0.002)))
        prefill.join(timeout=120)
        assert worst_gap < 0.25  # a chunk of 128 positions over 30 layers takes about a second here
        assert torch.equal(out, engine.forward_stage([sids[0]], [_x(0)], [pos[0]])[0])
    finally:
        engine.close_session("long")


def test_the_group_on_the_wire_is_a_bounded_batch_size() -> None:
    from core.types import Chunk
    from dataplane import rpc
    from dataplane.stage_wire import MAX_GROUP, decode_group, decode_reply, encode_reply

    reply = rpc.unpack_map(rpc.pack(encode_reply(Chunk(text="a"), 7, 3)))
    assert decode_group(reply) == 3 and decode_reply(reply)[1] == 7
    assert decode_group({"a": {}}) is None  # an older node's frame
    for bad in (0, -1, MAX_GROUP + 1, 2.0, True, "2", [2]):
        with pytest.raises(rpc.PayloadError):
            decode_group({"b": bad})


def test_the_driver_runs_groups_of_its_cap_and_yields_the_loop_between_them(engine) -> None:
    """Stage 0 of a ring of 2 runs 4 queued steps as two batches of 2; past `yield_after_s` of
    batches the first batch's sessions resume (and send their activations on) before the next runs."""
    sids = [f"ring{i}" for i in range(4)]
    for sid in sids:
        engine.open_session(sid, ring=2)
        engine.prefill_stage(sid, torch.tensor([1, 2, 3]), 0)
    try:
        b = LoopBatcher(engine, gather_s=5.0, yield_after_s=0.0)
        seen: dict[str, int] = {}

        async def one(i: int) -> None:
            _, _, size = await b.step(sids[i], _x(i), 3)
            assert size == 2
            seen[sids[i]] = b.batches  # batches run when this session got its output back

        async def main() -> None:
            await asyncio.gather(*(one(i) for i in range(4)))

        asyncio.run(main())
        assert b.batches == 2 and sorted(seen.values()) == [1, 1, 2, 2]
    finally:
        for sid in sids:
            engine.close_session(sid)


def test_the_batcher_does_not_keep_an_unloaded_engine_alive() -> None:
    """An idle range is unloaded by dropping its engine; the batcher must not hold its memory."""
    import gc
    import weakref

    from shard.spec import ShardSpec

    model = load_model_file("smollm2-135m-instruct")
    e = TorchShardEngine(model, spec=ShardSpec(model.digest, 0, 2, model.n_layers), max_sessions=2, max_context=64)
    e.open_session("s")
    b = LoopBatcher(e, gather_s=0.01)
    asyncio.run(b.step("s", torch.tensor([5]), 0))
    e.close_session("s")
    gone = weakref.ref(e)
    e.close()
    del e
    gc.collect()
    assert gone() is None
    with pytest.raises(SessionError, match="unloaded"):
        asyncio.run(b.step("s", torch.tensor([5]), 0))


class _CudaLike:
    """The engine surface the batcher uses, for a decode step whose CUDA graph is not captured yet
    (no GPU here): the batcher must run it off the loop, where capturing cannot stall heartbeats."""

    n_sessions = 1

    def __init__(self) -> None:
        self.threads: list[int] = []

    def step_cap(self) -> int:
        return 1 << 30

    def decode_ready(self, n: int) -> bool:
        return False

    def run_steps(self, sids, xs, positions, *, now: bool = False):
        assert not now, "a batch that needs a graph capture ran on the loop"
        self.threads.append(threading.get_ident())
        return [x.float() for x in xs]


def test_a_batch_that_must_capture_a_graph_runs_off_the_loop() -> None:
    fake = _CudaLike()

    async def main() -> int:
        await LoopBatcher(fake, gather_s=0.01).step("s", torch.tensor([5]), 0)  # type: ignore[arg-type]
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert fake.threads and fake.threads[0] != loop_thread
