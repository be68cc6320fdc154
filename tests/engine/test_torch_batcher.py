"""StepCombiner: concurrent submitters share batches; failures reach every waiter."""

import threading

import pytest
import torch

from engine.torch_batcher import Step, StepCombiner


def _step(i: int) -> Step:
    return Step(slot=i, x=torch.tensor([i]), start_pos=0)


def test_concurrent_steps_run_as_one_batch() -> None:
    sizes: list[int] = []

    def run(batch: list[Step]) -> None:
        sizes.append(len(batch))
        for s in batch:
            s.finish(s.x * 10)

    combiner = StepCombiner(run, expected=lambda: 4, gather_s=5.0)
    results: dict[int, int] = {}

    def submit(i: int) -> None:
        results[i] = int(combiner.submit([_step(i)])[0])

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
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
