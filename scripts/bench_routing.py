#!/usr/bin/env python3
"""Routing overhead and holder scaling, on loopback, in one run.

(1) Requests at A (no model) routed to B, against the same requests at B directly, alternating:
    TTFT p50 and tok/s p50 of greedy completions of the same prompt.
(2) Aggregate tok/s of 8 concurrent streams at A with B alone holding the model, then with B and C.
    Each holder runs with --threads 1, so two holders use the two cores a 2-core box has.

    .venv/bin/python scripts/bench_routing.py [--runs 5] [--tokens 128] [--streams 8]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_common import PROMPT, start_node, stop_nodes, stream_completion  # noqa: E402


def wait_peers(url: str, names: set[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url + "/mesh/peers") as resp:
            if names <= {p["name"] for p in json.loads(resp.read())}:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} never saw {names}")


def concurrent(url: str, streams: int, tokens: int) -> tuple[float, dict[str, int]]:
    results: list[tuple[float, float, int, str]] = []

    def one(i: int) -> None:
        results.append(stream_completion(url, tokens, f"{PROMPT} (story {i})"))

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    by_node: dict[str, int] = {}
    for *_, node in results:
        by_node[node] = by_node.get(node, 0) + 1
    return sum(r[2] for r in results) / wall, by_node


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--base-port", type=int, default=8850)
    args = ap.parse_args()
    secret = "bench-" + secrets.token_hex(4)
    holder = ("--threads", "1", "--ctx-size", "2048")
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as data_dir:
        try:
            a_url, b_url, c_url = (f"http://127.0.0.1:{args.base_port + i}" for i in range(3))
            procs.append(start_node("A", args.base_port, data_dir, "--mesh-secret", secret, "--no-model"))
            procs.append(start_node("B", args.base_port + 1, data_dir, "--mesh-secret", secret, *holder))
            wait_peers(a_url, {"B"})
            stream_completion(a_url, 8), stream_completion(b_url, 8)  # warm-up
            routed, direct = [], []
            for _ in range(args.runs):
                routed.append(stream_completion(a_url, args.tokens))
                direct.append(stream_completion(b_url, args.tokens))
            assert all(r[3] == "B" for r in routed)
            one_holder, spread_one = concurrent(a_url, args.streams, args.tokens)
            procs.append(start_node("C", args.base_port + 2, data_dir, "--mesh-secret", secret, *holder))
            wait_peers(a_url, {"B", "C"})
            stream_completion(c_url, 8)
            two_holders, spread_two = concurrent(a_url, args.streams, args.tokens)
        finally:
            stop_nodes(procs)

    def summary(rows: list[tuple[float, float, int, str]]) -> tuple[float, float]:
        return statistics.median(n / total for _, total, n, _ in rows), statistics.median(t * 1000 for t, *_ in rows)

    r_tps, r_ttft = summary(routed)
    d_tps, d_ttft = summary(direct)
    print(f"(1) direct at B : tok/s p50 {d_tps:6.1f}  TTFT p50 {d_ttft:6.1f} ms")
    print(f"    routed A->B : tok/s p50 {r_tps:6.1f}  TTFT p50 {r_ttft:6.1f} ms")
    print(f"    routed/direct tok/s {r_tps / d_tps:.3f} (target >= 0.95); TTFT overhead p50 {r_ttft - d_ttft:+.1f} ms (target <= 10)")
    print(f"(2) {args.streams} concurrent streams at A: B alone {one_holder:6.1f} tok/s {spread_one}; "
          f"B+C {two_holders:6.1f} tok/s {spread_two}")
    print(f"    two holders / one holder {two_holders / one_holder:.2f}x (target >= 1.7x)")
    print(f"machine: {os.cpu_count()} CPUs; holders --threads 1; runs {args.runs}; tokens {args.tokens}")


if __name__ == "__main__":
    main()
