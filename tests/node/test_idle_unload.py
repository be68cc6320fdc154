"""The pure decision of which ranges loaded for the mesh to unload (node/idle_unload.py)."""

from __future__ import annotations

import pytest

from node.idle_unload import RangeUse, Usage, idle_ranges

IDLE_S = 600.0
NOW = 10_000.0


def use(digest: str = "a", *, on_request: bool = True, idle_for_s: float = IDLE_S, sessions: int = 0) -> RangeUse:
    return RangeUse(digest, on_request, NOW - idle_for_s, sessions)


@pytest.mark.parametrize(
    ("uses", "expected"),
    [
        pytest.param([use()], ["a"], id="idle exactly the limit"),
        pytest.param([use(idle_for_s=IDLE_S - 0.001)], [], id="just under the limit"),
        pytest.param([use(on_request=False, idle_for_s=10 * IDLE_S)], [], id="started by the user: never"),
        pytest.param([use(sessions=1, idle_for_s=10 * IDLE_S)], [], id="a session open"),
        pytest.param([use("a"), use("b", idle_for_s=1.0), use("c", idle_for_s=2 * IDLE_S)], ["a", "c"],
                     id="only the idle ones, in order"),
        pytest.param([], [], id="nothing loaded"),
    ],
)
def test_idle_ranges(uses: list[RangeUse], expected: list[str]) -> None:
    assert idle_ranges(uses, NOW, IDLE_S) == expected


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError):
        idle_ranges([use()], NOW, 0.0)
    with pytest.raises(ValueError):
        RangeUse("a", True, NOW, -1)


def test_usage_keeps_the_latest_touch_and_forgets() -> None:
    usage = Usage()
    assert usage.last_s("a", 5.0) == 5.0  # never touched: the caller's default (e.g. now: not idle)
    usage.touch("a", 10.0)
    usage.touch("a", 8.0)  # a late report of an older step does not make it look idler
    assert usage.last_s("a", 0.0) == 10.0
    usage.touch("a", 12.0)
    assert usage.last_s("a", 0.0) == 12.0
    usage.forget("a")
    assert usage.last_s("a", 1.0) == 1.0
    assert idle_ranges([RangeUse("a", True, usage.last_s("a", NOW), 0)], NOW, IDLE_S) == []


def test_a_request_that_ends_counts_as_use_at_its_end() -> None:
    usage = Usage()
    usage.observe(["a"], 10.0)  # a request starts on a
    usage.observe(["a", "b"], 50.0)  # one starts on b: a is still busy
    usage.observe(["b"], 70.0)  # a's request ended now
    assert usage.last_s("a", 0.0) == 70.0
    usage.observe([], 90.0)  # b's ended
    usage.observe([], 500.0)  # another model's load changed: a and b stay idle since they ended
    assert (usage.last_s("a", 0.0), usage.last_s("b", 0.0)) == (70.0, 90.0)
    usage.observe(["a"], 600.0)
    usage.forget("a")  # unloaded while (wrongly) busy: not touched again by the next call
    usage.observe([], 700.0)
    assert usage.last_s("a", -1.0) == -1.0
