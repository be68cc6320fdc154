#!/usr/bin/env python3
"""Routing overhead and holder scaling, on loopback, in one run.

(1) Requests at A (no model) routed to B, against the same requests at B directly, alternating:
    TTFT p50 and tok/s p50 of greedy completions of the same prompt.
(2) Aggregate tok/s of 8 concurrent streams at A with B alone holding the model, then with B and C.
    Each holder runs with --threads 1, so two holders use the two cores a 2-core box has.

--data-plane mtls (default) | insecure (--insecure-data-plane) | both: with both, two meshes run side
by side (the second on ports base+10) and every measurement alternates between them, so the mTLS
cost is read from one run.

    .venv/bin/python scripts/bench_routing.py [--runs 5] [--tokens 128] [--streams 8] [--data-plane both]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from discovery.identity import KEY_FILE, Identity  # noqa: E402
from scripts.bench_common import (  # noqa: E402
    DATA_PLANE_CHOICES,
    DATA_PLANE_FLAGS,
    PROMPT,
    data_planes,
    start_node,
    stop_nodes,
    stream_completion,
)


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


def alternate(planes: list[str], urls: dict[str, list[str]], args: argparse.Namespace) -> dict[str, tuple[float, dict[str, int]]]:
    """The concurrent phase, --rounds times per data plane, alternating; the round of median tok/s."""
    rounds: dict[str, list[tuple[float, dict[str, int]]]] = {p: [] for p in planes}
    for _ in range(args.rounds):
        for plane in planes:
            rounds[plane].append(concurrent(urls[plane][0], args.streams, args.tokens))
            print(f"  round [{plane}]: {rounds[plane][-1][0]:6.1f} tok/s {rounds[plane][-1][1]}", flush=True)
    return {p: sorted(rows, key=lambda r: r[0])[len(rows) // 2] for p, rows in rounds.items()}


def summary(rows: list[tuple[float, float, int, str]]) -> tuple[float, float]:
    return statistics.median(n / total for _, total, n, _ in rows), statistics.median(t * 1000 for t, *_ in rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1, help="concurrent-phase rounds (median)")
    ap.add_argument("--base-port", type=int, default=8850)
    ap.add_argument("--data-plane", choices=DATA_PLANE_CHOICES, default="mtls")
    args = ap.parse_args()
    planes = data_planes(args.data_plane)
    holder = ("--threads", "1", "--ctx-size", "2048")
    procs: list[subprocess.Popen] = []
    urls = {plane: [f"http://127.0.0.1:{args.base_port + 10 * k + i}" for i in range(3)] for k, plane in enumerate(planes)}
    routed: dict[str, list] = {p: [] for p in planes}
    direct: dict[str, list] = {p: [] for p in planes}
    one_holder: dict[str, tuple[float, dict[str, int]]] = {}
    two_holders: dict[str, tuple[float, dict[str, int]]] = {}
    with tempfile.TemporaryDirectory() as data_dir:
        try:
            # the same node ids in both meshes: holders tie-break by rendezvous hashing over node ids, so
            # different ids would split the 8 streams differently (5/3 vs 4/4) whatever the data plane
            for name in ("A", "B", "C"):
                Identity.load_or_create(Path(data_dir) / f"{name}0")
                for k in range(1, len(planes)):
                    (Path(data_dir) / f"{name}{k}").mkdir()
                    shutil.copy(Path(data_dir) / f"{name}0" / KEY_FILE, Path(data_dir) / f"{name}{k}" / KEY_FILE)
            flags = {plane: ("--mesh-secret", "bench-" + secrets.token_hex(4), *DATA_PLANE_FLAGS[plane]) for plane in planes}
            for k, plane in enumerate(planes):
                port = args.base_port + 10 * k
                procs.append(start_node("A", port, data_dir, *flags[plane], "--no-model", subdir=f"A{k}"))
                procs.append(start_node("B", port + 1, data_dir, *flags[plane], *holder, subdir=f"B{k}"))
            for plane in planes:
                a_url, b_url, _ = urls[plane]
                wait_peers(a_url, {"B"})
                stream_completion(a_url, 8), stream_completion(b_url, 8)  # warm-up
            for _ in range(args.runs):
                for plane in planes:
                    a_url, b_url, _ = urls[plane]
                    routed[plane].append(stream_completion(a_url, args.tokens))
                    direct[plane].append(stream_completion(b_url, args.tokens))
            assert all(r[3] == "B" for rows in routed.values() for r in rows)
            one_holder = alternate(planes, urls, args)
            for k, plane in enumerate(planes):
                procs.append(start_node("C", args.base_port + 10 * k + 2, data_dir, *flags[plane], *holder, subdir=f"C{k}"))
            for plane in planes:
                wait_peers(urls[plane][0], {"B", "C"})
                stream_completion(urls[plane][2], 8)
            two_holders = alternate(planes, urls, args)
        finally:
            stop_nodes(procs)

    for plane in planes:
        r_tps, r_ttft = summary(routed[plane])
        d_tps, d_ttft = summary(direct[plane])
        one, spread_one = one_holder[plane]
        two, spread_two = two_holders[plane]
        print(f"[data plane: {plane}]")
        print(f"(1) direct at B : tok/s p50 {d_tps:6.1f}  TTFT p50 {d_ttft:6.1f} ms")
        print(f"    routed A->B : tok/s p50 {r_tps:6.1f}  TTFT p50 {r_ttft:6.1f} ms")
        print(f"    routed/direct tok/s {r_tps / d_tps:.3f} (target >= 0.95); TTFT overhead p50 {r_ttft - d_ttft:+.1f} ms (target <= 10)")
        print(f"(2) {args.streams} concurrent streams at A: B alone {one:6.1f} tok/s {spread_one}; "
              f"B+C {two:6.1f} tok/s {spread_two}")
        print(f"    two holders / one holder {two / one:.2f}x (target >= 1.7x)")
    if len(planes) == 2:
        (m_tps, m_ttft), (i_tps, i_ttft) = summary(routed["mtls"]), summary(routed["insecure"])
        print(f"mTLS vs insecure: routed tok/s {m_tps / i_tps:.3f}, TTFT {m_ttft - i_ttft:+.1f} ms; "
              f"aggregate B alone {one_holder['mtls'][0] / one_holder['insecure'][0]:.3f}, "
              f"B+C {two_holders['mtls'][0] / two_holders['insecure'][0]:.3f} (target >= 0.95)")
    print(f"machine: {os.cpu_count()} CPUs; holders --threads 1; runs {args.runs}; tokens {args.tokens}")


if __name__ == "__main__":
    main()
