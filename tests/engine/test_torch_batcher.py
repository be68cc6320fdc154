"""StepCombiner: concurrent submitters share batches; failures reach every waiter; the stage that drives
sessions round a pipeline of R stages batches at most 1/R of them at a time (R micro-batches keep
every stage busy, where all of them in one batch is lockstep)."""

import threading
import time

import pytest
import torch

from engine.torch_batcher import Step, StepCombiner


def _step(i: int) -> Step:
    return Step(slot=i, x=torch.tensor([i]), start_pos=0)


def _from_threads(combiner: StepCombiner, n: int) -> dict[int, int]:
    """Steps of slots 0..n-1 submitted by a thread each; their results by slot."""
    results: dict[int, int] = {}

    def submit(i: int) -> None:
        results[i] = int(combiner.submit([_step(i)])[0])

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    return results


def test_concurrent_steps_run_as_one_batch() -> None:
    sizes: list[int] = []

    def run(batch: list[Step]) -> None:
        sizes.append(len(batch))
        for s in batch:
            s.finish(s.x * 10)

    combiner = StepCombiner(run, expected=lambda: 4, gather_s=5.0)
    results = _from_threads(combiner, 4)
    assert sizes == [4] and results == {0: 0, 1: 10, 2: 20, 3: 30}


def test_single_stream_does_not_wait() -> None:
    combiner = StepCombiner(lambda b: [s.finish(s.x) for s in b], expected=lambda: 1, gather_s=60)
    assert [int(r) for r in combiner.submit([_step(1), _step(2)])] == [1, 2]


def test_failure_reaches_every_step_and_the_combiner_recovers() -> None:
    def run(batch: list[Step]) -> None:
        if any(int(s.x) == 13 for s in batch):
            raise RuntimeError("bad step")
        for s in batch:
            s.finish(s.x)

    combiner = StepCombiner(run)
    with pytest.raises(RuntimeError):
        combiner.submit([_step(1), _step(13)])
    assert int(combiner.submit([_step(2)])[0]) == 2


def test_an_unfinished_step_is_requeued_until_its_last_chunk() -> None:
    """A run_batch that advances a long step one chunk per batch while short steps come and go: the
    long step's thread gets its result only after all its chunks, in order."""
    chunks: list[list[str]] = []

    def run(batch: list[Step]) -> None:
        chunks.append([("long" if s.x.shape[0] > 1 else "short") for s in batch])
        for s in batch:
            if s.x.shape[0] > 1:
                s.offset += 1
                s.parts.append(s.x[s.offset - 1 : s.offset])
                if s.offset == s.x.shape[0]:
                    s.finish(torch.cat(s.parts))
            else:
                s.finish(s.x)

    combiner = StepCombiner(run)
    out: dict[str, torch.Tensor] = {}
    long = threading.Thread(target=lambda: out.update(long=combiner.submit([Step(0, torch.arange(5), 0)])[0]))
    long.start()
    for i in range(3):
        out[f"s{i}"] = combiner.submit([_step(i)])[0]
    long.join(10)
    assert out["long"].tolist() == [0, 1, 2, 3, 4]
    assert sum(b.count("long") for b in chunks) == 5  # one chunk per batch


def _recording(n_open: int) -> tuple[StepCombiner, list[list[int]]]:
    batches: list[list[int]] = []

    def run(batch: list[Step]) -> None:
        batches.append(sorted(s.slot for s in batch))
        for s in batch:
            s.finish(s.x)

    return StepCombiner(run, expected=lambda: n_open, gather_s=0.5), batches


def test_all_queued_at_once_run_in_as_many_groups_as_stages() -> None:
    for ring, expected in ((2, [[0, 1], [2, 3]]), (3, [[0, 1], [2, 3]]), (4, [[0], [1], [2], [3]]), (1, [[0, 1, 2, 3]])):
        combiner, batches = _recording(4)
        for slot in range(4):
            combiner.opened(slot, ring)
        assert [int(r) for r in combiner.submit([_step(s) for s in range(4)])] == [0, 1, 2, 3]
        assert batches == expected, ring


def test_the_cap_follows_the_sessions_open_and_closed() -> None:
    combiner, batches = _recording(3)
    for slot in range(3):
        combiner.opened(slot, 2)
    combiner.submit([_step(s) for s in range(3)])
    assert batches == [[0, 1], [2]]  # 3 open on 2 stages: 2 a batch
    for slot in range(3):
        combiner.closed(slot)
    batches.clear()
    combiner.submit([_step(s) for s in range(3)])
    assert batches == [[0, 1, 2]]  # nobody driven round a pipeline any more


def test_concurrent_submitters_on_a_pipeline_are_all_served() -> None:
    """Four threads, four sessions on 2 stages: every step runs once, two at a time at most."""
    combiner, batches = _recording(4)
    for slot in range(4):
        combiner.opened(slot, 2)
    assert _from_threads(combiner, 4) == {0: 0, 1: 1, 2: 2, 3: 3}
    assert sorted(s for b in batches for s in b) == [0, 1, 2, 3] and max(len(b) for b in batches) <= 2


def test_run_now_runs_on_the_caller_or_declines_while_a_batch_is_in_flight() -> None:
    """A caller that gathers its own steps (the stage's event loop) never waits behind another batch:
    run_now runs its steps at once, without gathering, or declines and runs nothing."""
    entered, release, sizes = threading.Event(), threading.Event(), []

    def run(batch: list[Step]) -> None:
        sizes.append(len(batch))
        if any(int(s.x) == 99 for s in batch):  # a long batch (a prompt chunk) on another thread
            entered.set()
            release.wait(10)
        for s in batch:
            s.finish(s.x)

    combiner = StepCombiner(run, expected=lambda: 4, gather_s=0.5)  # submit waits for 4 steps
    steps = [_step(1), _step(2)]
    t0 = time.monotonic()
    assert combiner.run_now(steps) and [int(s.result) for s in steps] == [1, 2] and sizes == [2]
    assert time.monotonic() - t0 < 0.4  # no gathering
    long = threading.Thread(target=combiner.submit, args=([Step(0, torch.tensor([99]), 0)],))
    long.start()
    assert entered.wait(10)
    late = _step(3)
    assert not combiner.run_now([late]) and not late.done
    release.set()
    long.join(10)
    assert combiner.run_now([late]) and int(late.result) == 3


def test_one_session_on_a_long_chain_does_not_cut_the_others_batches() -> None:
    """Rings are named by clients (the chain): a 64-stage one beside three sessions on 2 stages keeps
    the cap at half the sessions, not 1."""
    combiner, batches = _recording(4)
    for slot in range(3):
        combiner.opened(slot, 2)
    combiner.opened(3, 64)
    assert combiner.cap() == 2
    combiner.submit([_step(s) for s in range(4)])
    assert batches == [[0, 1], [2, 3]]
