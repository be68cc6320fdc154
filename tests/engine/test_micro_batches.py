"""StepCombiner on the stage that drives sessions round a pipeline (engine/torch_batcher.py): at most 1/R
of the open sessions per batch for R stages, so R micro-batches keep every stage busy instead of all of
them moving in lockstep. A whole model, and a later stage, batch everything queued."""

import threading

import torch

from engine.torch_batcher import Step, StepCombiner


def _step(slot: int) -> Step:
    return Step(slot=slot, x=torch.tensor([slot]), start_pos=0)


def _combiner(n_open: int) -> tuple[StepCombiner, list[list[int]]]:
    batches: list[list[int]] = []

    def run(batch: list[Step]) -> None:
        batches.append(sorted(s.slot for s in batch))
        for s in batch:
            s.finish(s.x)

    return StepCombiner(run, expected=lambda: n_open, gather_s=0.5), batches


def test_all_queued_at_once_run_in_as_many_groups_as_stages() -> None:
    for ring, expected in ((2, [[0, 1], [2, 3]]), (3, [[0, 1], [2, 3]]), (4, [[0], [1], [2], [3]]), (1, [[0, 1, 2, 3]])):
        combiner, batches = _combiner(4)
        for slot in range(4):
            combiner.opened(slot, ring)
        assert [int(r) for r in combiner.submit([_step(s) for s in range(4)])] == [0, 1, 2, 3]
        assert batches == expected, ring


def test_the_cap_follows_the_sessions_open_and_closed() -> None:
    combiner, batches = _combiner(3)
    for slot in range(3):
        combiner.opened(slot, 2)
    combiner.submit([_step(s) for s in range(3)])
    assert batches == [[0, 1], [2]]  # 3 open on 2 stages: 2 a batch
    for slot in range(3):
        combiner.closed(slot)
    batches.clear()
    combiner.submit([_step(s) for s in range(3)])
    assert batches == [[0, 1, 2]]  # nobody driven round a pipeline any more


def test_concurrent_submitters_are_all_served() -> None:
    """Four threads, four sessions on 2 stages: every step runs once, two at a time at most."""
    combiner, batches = _combiner(4)
    for slot in range(4):
        combiner.opened(slot, 2)
    results: dict[int, int] = {}

    def submit(i: int) -> None:
        results[i] = int(combiner.submit([_step(i)])[0])

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert results == {0: 0, 1: 1, 2: 2, 3: 3}
    assert sorted(s for b in batches for s in b) == [0, 1, 2, 3] and max(len(b) for b in batches) <= 2
