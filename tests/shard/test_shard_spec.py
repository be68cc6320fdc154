import pytest

from shard.spec import ShardSpec


@pytest.mark.parametrize(
    ("start", "end", "n", "first", "last", "whole", "count"),
    [
        (0, 30, 30, True, True, True, 30),
        (0, 7, 30, True, False, False, 7),
        (7, 19, 30, False, False, False, 12),
        (19, 30, 30, False, True, False, 11),
        (0, 1, 1, True, True, True, 1),
    ],
)
def test_properties(start: int, end: int, n: int, first: bool, last: bool, whole: bool, count: int) -> None:
    spec = ShardSpec("d" * 64, start, end, n)
    assert (spec.is_first, spec.is_last, spec.whole, spec.n_stage_layers) == (first, last, whole, count)


@pytest.mark.parametrize(("start", "end", "n"), [(-1, 3, 30), (3, 3, 30), (5, 2, 30), (0, 31, 30), (0, 1, 0)])
def test_rejects_bad_ranges(start: int, end: int, n: int) -> None:
    with pytest.raises(ValueError):
        ShardSpec("d" * 64, start, end, n)


def test_whole_model_and_frozen() -> None:
    spec = ShardSpec.whole_model("abc", 12)
    assert spec == ShardSpec("abc", 0, 12, 12)
    with pytest.raises(AttributeError):
        spec.start = 1  # type: ignore[misc]
