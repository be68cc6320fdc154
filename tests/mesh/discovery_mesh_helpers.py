"""Helpers for the real-process discovery tests: parallel start-ups, polling peer tables, timing.

A unique module name: tests/ has no __init__.py, so helper basenames must not collide.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

POLL_S = 0.1
HTTP_TIMEOUT_S = 5.0


def mesh_secret(tag: str) -> str:
    """A secret no other test (or engineer's node) on this machine shares: meshes never mix."""
    return f"test-{tag}-{secrets.token_hex(8)}"


def get_json(url: str, timeout_s: float = HTTP_TIMEOUT_S) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def peer_ids(url: str) -> set[str]:
    """Node ids in a node's /mesh/peers; empty when the node does not answer (busy or gone)."""
    try:
        return {row["node_id"] for row in get_json(url + "/mesh/peers")}
    except (urllib.error.URLError, OSError, ValueError):
        return set()


def peer_ids_strict(url: str) -> set[str] | None:
    """Like peer_ids, but None when the node does not answer, so "not listed" is never a guess."""
    try:
        return {row["node_id"] for row in get_json(url + "/mesh/peers")}
    except (urllib.error.URLError, OSError, ValueError):
        return None


def node_id(url: str) -> str:
    return get_json(url + "/mesh/self")["node_id"]


def start_parallel(make: Callable[..., Any], specs: Sequence[tuple[Any, ...]]) -> list[tuple[Any, float]]:
    """Starts nodes concurrently (make(*spec) blocks until the ready line); returns (node, ready_at)."""

    def one(spec: tuple[Any, ...]) -> tuple[Any, float]:
        node = make(*spec)
        return node, time.monotonic()

    with ThreadPoolExecutor(max_workers=len(specs)) as pool:
        return list(pool.map(one, specs))


def wait_for(pred: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Polls pred() every POLL_S; returns the seconds it took, raises AssertionError on timeout."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(POLL_S)
    return time.monotonic() - t0


def hold_for(pred: Callable[[], bool], duration_s: float, what: str) -> None:
    """Asserts pred() holds at every poll for duration_s."""
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:
        assert pred(), what
        time.sleep(POLL_S)
