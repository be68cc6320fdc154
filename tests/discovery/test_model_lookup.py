"""Lookups are throttled: one per name per LOOKUP_EVERY_S, MAX_LOOKUPS_PER_MINUTE in all, names capped."""

from __future__ import annotations

import pytest

from discovery.advert import ModelAdvert
from discovery.model_lookup import LOOKUP_EVERY_S, MAX_LOOKUPS_PER_MINUTE, MAX_TRACKED_NAMES, ModelLookups
from discovery.model_records import model_keys, record_key


@pytest.mark.parametrize(("calls", "expected"), [
    ([("m", 0.0)], [True]),
    ([("m", 0.0), ("m", 1.0)], [True, False]),
    ([("m", 0.0), ("m", LOOKUP_EVERY_S)], [True, True]),
    ([("m", 0.0), ("n", 0.1)], [True, True]),
    ([("", 0.0), ("x" * 129, 0.0)], [False, False]),
])
def test_allow(calls: list[tuple[str, float]], expected: list[bool]) -> None:
    lookups = ModelLookups()
    assert [lookups.allow(name, now) for name, now in calls] == expected


def test_at_most_so_many_lookups_a_minute_then_again() -> None:
    lookups = ModelLookups()
    allowed = [lookups.allow(f"m{i}", i * 0.1) for i in range(MAX_LOOKUPS_PER_MINUTE + 5)]
    assert allowed.count(True) == MAX_LOOKUPS_PER_MINUTE
    assert lookups.allow("later", 61.0)


def test_tracked_names_are_capped() -> None:
    lookups = ModelLookups()
    for i in range(3 * MAX_TRACKED_NAMES):
        lookups.allow(f"m{i}", i * 3.0)
    assert len(lookups._last) <= MAX_TRACKED_NAMES


def test_lookup_sends_the_record_key_or_nothing_without_a_host() -> None:
    sent: list[str] = []
    lookups = ModelLookups()
    assert not lookups.lookup("m", 0.0)
    lookups.send = sent.append
    assert lookups.lookup("m", 10.0) and not lookups.lookup("m", 10.5)
    assert sent == [record_key("m")] and (lookups.sent, lookups.refused) == (1, 2)


def test_a_holder_provides_a_key_per_digest_and_alias() -> None:
    m = ModelAdvert("ab" * 32, "small", 30, 0, 30, "llama.cpp", 2048)
    assert model_keys([m, m]) == [record_key("ab" * 32), record_key("small")]
