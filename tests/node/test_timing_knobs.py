"""The timing knobs tests shorten (--advert-ttl-s, --header-timeout-s, --body-timeout-s): their defaults
are the modules' own constants, and values out of range, infinite or NaN are refused."""

from __future__ import annotations

import math

import pytest

from discovery.service import DEFAULT_TTL_S
from gateway.app import BODY_TIMEOUT_S, HEADER_TIMEOUT_S
from node.config import NodeConfig


def test_defaults_are_the_modules_constants() -> None:
    c = NodeConfig(mesh_secret="s")
    assert (c.advert_ttl_s, c.header_timeout_s, c.body_timeout_s) == (DEFAULT_TTL_S, HEADER_TIMEOUT_S, BODY_TIMEOUT_S)


@pytest.mark.parametrize(("field", "value"), [
    ("advert_ttl_s", 1.0), ("advert_ttl_s", 61.0), ("advert_ttl_s", math.nan),
    ("header_timeout_s", 0.0), ("header_timeout_s", math.nan), ("header_timeout_s", math.inf), ("header_timeout_s", 601.0),
    ("body_timeout_s", -1.0), ("body_timeout_s", math.nan),
])
def test_bad_values_are_refused(field: str, value: float) -> None:
    with pytest.raises(ValueError):
        NodeConfig(mesh_secret="s", **{field: value})  # type: ignore[arg-type]


def test_short_values_for_tests_are_taken() -> None:
    c = NodeConfig(mesh_secret="s", advert_ttl_s=4.0, header_timeout_s=4.0, body_timeout_s=5.0)
    assert (c.advert_ttl_s, c.header_timeout_s, c.body_timeout_s) == (4.0, 4.0, 5.0)
