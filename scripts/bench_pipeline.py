#!/usr/bin/env python3
"""Pipeline against the torch whole-model engine, on loopback, in one run.

(a) Single-stream decode tok/s of a 2-stage pipeline (each stage --threads T/2, driven through a
    gateway node holding no layers) against the torch whole-model engine (--threads T), alternating.
    Per-hop overhead: the pipeline's time per token minus the compute its stages report (their
    in-thread forward time, from /mesh/self), divided by the hops a token makes: stage 0 -> stage 1,
    the sampled token back, and stage 0 -> gateway.
(b) Aggregate decode tok/s of 4 concurrent streams through the pipeline against one stream.

--data-plane mtls (default) | insecure (--insecure-data-plane) | both: with both, two pipelines run
side by side and every measurement alternates between them, so the mTLS cost is read from one run.

    .venv/bin/python scripts/bench_pipeline.py [--runs 5] [--tokens 96] [--threads 2] [--split 15] [--data-plane both]
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

from scripts.bench_common import (  # noqa: E402
    DATA_PLANE_CHOICES,
    DATA_PLANE_FLAGS,
    MODEL,
    PROMPT,
    data_planes,
    start_node,
    stop_nodes,
)


def decode_rate(url: str, tokens: int, prompt: str = PROMPT) -> tuple[float, int]:
    """Decode tok/s (tokens after the first over the time after the first) and the token count."""
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
                       "return_token_ids": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    first = None
    n = 0
    with urllib.request.urlopen(req, timeout=600) as resp:
        for line in resp:
            if line.startswith(b"data: {"):
                ids = json.loads(line[6:])["choices"][0].get("token_ids") or []
                if ids and first is None:
                    first = time.perf_counter()
                n += len(ids)
    end = time.perf_counter()
    return (n - 1) / (end - first), n


def _stage_stats(url: str) -> tuple[int, float]:
    """(decode steps, total decode compute ms) a stage reports."""
    with urllib.request.urlopen(url + "/mesh/self") as resp:
        stats = json.loads(resp.read())["pipeline"]
    return stats["decode_steps"], stats["decode_steps"] * stats["decode_step_ms"]


def _aggregate(g_url: str, tokens: int) -> tuple[float, float]:
    """(aggregate tok/s of 4 concurrent streams, tok/s of one stream) through the gateway."""
    results: list[tuple[float, int]] = []

    def one(i: int) -> None:
        start = time.perf_counter()
        _, n = decode_rate(g_url, tokens, f"{PROMPT} (story {i})")
        results.append((time.perf_counter() - start, n))

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    aggregate = sum(n for _, n in results) / wall
    single_start = time.perf_counter()
    _, n_single = decode_rate(g_url, tokens, f"{PROMPT} (story 0)")
    return aggregate, n_single / (time.perf_counter() - single_start)


def _wait_pipeline(g_url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(g_url + "/v1/models") as resp:
            if json.loads(resp.read())["data"]:
                return
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway never saw the pipeline")
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--split", type=int, default=15, help="first layer of stage 1")
    ap.add_argument("--rounds", type=int, default=1, help="concurrent-phase rounds (median)")
    ap.add_argument("--base-port", type=int, default=8870)
    ap.add_argument("--data-plane", choices=DATA_PLANE_CHOICES, default="mtls",
                    help="both: a pipeline of each, side by side (the second on ports base+10), alternating")
    args = ap.parse_args()
    planes = data_planes(args.data_plane)
    half = str(max(1, args.threads // 2))
    procs: list[subprocess.Popen] = []
    w_url = f"http://127.0.0.1:{args.base_port}"
    g_urls = {plane: f"http://127.0.0.1:{args.base_port + 10 * k + 1}" for k, plane in enumerate(planes)}
    stage_urls = {plane: [f"http://127.0.0.1:{args.base_port + 10 * k + i}" for i in (2, 3)] for k, plane in enumerate(planes)}
    whole: list[float] = []
    piped: dict[str, list[float]] = {p: [] for p in planes}
    compute_ms: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as data_dir:
        try:
            procs.append(start_node("W", args.base_port, data_dir, "--engine", "torch", "--threads", str(args.threads),
                                    "--mesh-secret", "bench-ref-" + secrets.token_hex(4)))
            for k, plane in enumerate(planes):
                flags = ("--mesh-secret", "bench-pipe-" + secrets.token_hex(4), *DATA_PLANE_FLAGS[plane])
                port = args.base_port + 10 * k
                procs.append(start_node("G", port + 1, data_dir, "--no-model", *flags, subdir=f"G{k}"))
                procs.append(start_node("S0", port + 2, data_dir, "--shard", f"{MODEL}:0-{args.split}",
                                        "--threads", half, *flags, subdir=f"S0{k}"))
                procs.append(start_node("S1", port + 3, data_dir, "--shard", f"{MODEL}:{args.split}-30",
                                        "--threads", half, *flags, subdir=f"S1{k}"))
            decode_rate(w_url, 8)  # warm-up
            for plane in planes:
                _wait_pipeline(g_urls[plane])
                decode_rate(g_urls[plane], 8)
            before = {plane: [_stage_stats(u) for u in stage_urls[plane]] for plane in planes}
            for _ in range(args.runs):
                whole.append(decode_rate(w_url, args.tokens)[0])
                for plane in planes:
                    piped[plane].append(decode_rate(g_urls[plane], args.tokens)[0])
            for plane in planes:
                after = [_stage_stats(u) for u in stage_urls[plane]]
                # Mean in-thread decode compute per token, summed over the stages.
                compute_ms[plane] = sum((a[1] - b[1]) / max(1, a[0] - b[0])
                                        for a, b in zip(after, before[plane], strict=True))
            rounds: dict[str, list[tuple[float, float]]] = {p: [] for p in planes}
            for plane in planes:  # warm-up: batches of 2-4 build their ggml graphs once (engine/ggml_graphs.py)
                _aggregate(g_urls[plane], 8)
            for _ in range(args.rounds):
                for plane in planes:
                    rounds[plane].append(_aggregate(g_urls[plane], args.tokens))
            concurrency = {p: sorted(rows)[len(rows) // 2] for p, rows in rounds.items()}  # median round
        finally:
            stop_nodes(procs)
    w = statistics.median(whole)
    for plane in planes:
        p = statistics.median(piped[plane])
        hop_ms = (1000 / p - compute_ms[plane]) / 3
        aggregate, single = concurrency[plane]
        print(f"[data plane: {plane}]")
        print(f"(a) torch whole model (--threads {args.threads}): {w:6.1f} tok/s   2-stage pipeline "
              f"(--threads {half} each, split at {args.split}): {p:6.1f} tok/s")
        print(f"    pipeline/whole {p / w:.3f} (target >= 0.85); per-token {1000 / p:.2f} ms vs {1000 / w:.2f} ms")
        print(f"    stage compute {compute_ms[plane]:.2f} ms per token; per-hop overhead {hop_ms:.2f} ms over 3 hops "
              "(target <= 0.5)")
        print(f"(b) 4 concurrent streams {aggregate:6.1f} tok/s vs one stream {single:6.1f} tok/s: "
              f"{aggregate / single:.2f}x (target >= 1.5x; the median round)")
        if len(rounds[plane]) > 1:  # the spread: a round in lockstep runs far slower than one in two groups
            print("    every round (4 streams / one): " + ", ".join(f"{a:.1f} / {o:.1f} = {a / o:.2f}x"
                                                             for a, o in rounds[plane]))
    if len(planes) == 2:
        m, i = statistics.median(piped["mtls"]), statistics.median(piped["insecure"])
        print(f"mTLS vs insecure: pipeline tok/s {m / i:.3f}, per-token {1000 / m - 1000 / i:+.2f} ms; "
              f"4 streams {concurrency['mtls'][0] / concurrency['insecure'][0]:.3f} (target >= 0.95)")
    print(f"machine: {os.cpu_count()} CPUs; runs {args.runs}; tokens {args.tokens}")


if __name__ == "__main__":
    main()
