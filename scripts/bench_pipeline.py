#!/usr/bin/env python3
"""Pipeline against the torch whole-model engine, on loopback, in one run.

(a) Single-stream decode tok/s of a 2-stage pipeline (each stage --threads T/2, driven through a
    gateway node holding no layers) against the torch whole-model engine (--threads T), alternating.
    Per-hop overhead: the pipeline's time per token minus the compute its stages report (their
    in-thread forward time, from /mesh/self), divided by the hops a token makes: stage 0 -> stage 1,
    the sampled token back, and stage 0 -> gateway.
(b) Aggregate decode tok/s of 4 concurrent streams through the pipeline against one stream.

    .venv/bin/python scripts/bench_pipeline.py [--runs 5] [--tokens 96] [--threads 2] [--split 15]
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

from scripts.bench_common import MODEL, PROMPT, start_node, stop_nodes  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--split", type=int, default=15, help="first layer of stage 1")
    ap.add_argument("--base-port", type=int, default=8870)
    args = ap.parse_args()
    half = str(max(1, args.threads // 2))
    secret = "bench-pipe-" + secrets.token_hex(4)
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as data_dir:
        try:
            w_url, g_url = (f"http://127.0.0.1:{args.base_port + i}" for i in range(2))
            procs.append(start_node("W", args.base_port, data_dir, "--engine", "torch", "--threads", str(args.threads),
                                    "--mesh-secret", "bench-ref-" + secrets.token_hex(4)))
            procs.append(start_node("G", args.base_port + 1, data_dir, "--no-model", "--mesh-secret", secret))
            procs.append(start_node("S0", args.base_port + 2, data_dir, "--shard", f"{MODEL}:0-{args.split}",
                                    "--threads", half, "--mesh-secret", secret))
            procs.append(start_node("S1", args.base_port + 3, data_dir, "--shard", f"{MODEL}:{args.split}-30",
                                    "--threads", half, "--mesh-secret", secret))
            deadline = time.monotonic() + 30
            while True:
                with urllib.request.urlopen(g_url + "/v1/models") as resp:
                    if json.loads(resp.read())["data"]:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("the gateway never saw the pipeline")
                time.sleep(0.2)
            decode_rate(w_url, 8), decode_rate(g_url, 8)  # warm-up
            stage_urls = [f"http://127.0.0.1:{args.base_port + i}" for i in (2, 3)]
            before = [_stage_stats(u) for u in stage_urls]
            whole, piped = [], []
            for _ in range(args.runs):
                whole.append(decode_rate(w_url, args.tokens)[0])
                piped.append(decode_rate(g_url, args.tokens)[0])
            after = [_stage_stats(u) for u in stage_urls]
            # Mean in-thread decode compute per token, summed over the stages.
            compute_ms = sum((a[1] - b[1]) / max(1, a[0] - b[0]) for a, b in zip(after, before, strict=True))
            results: list[tuple[float, int]] = []

            def one(i: int) -> None:
                start = time.perf_counter()
                _, n = decode_rate(g_url, args.tokens, f"{PROMPT} (story {i})")
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
            _, n_single = decode_rate(g_url, args.tokens, f"{PROMPT} (story 0)")
            single = n_single / (time.perf_counter() - single_start)
        finally:
            stop_nodes(procs)
    w, p = statistics.median(whole), statistics.median(piped)
    hop_ms = (1000 / p - compute_ms) / 3
    print(f"(a) torch whole model (--threads {args.threads}): {w:6.1f} tok/s   2-stage pipeline "
          f"(--threads {half} each, split at {args.split}): {p:6.1f} tok/s")
    print(f"    pipeline/whole {p / w:.3f} (target >= 0.85); per-token {1000 / p:.2f} ms vs {1000 / w:.2f} ms")
    print(f"    stage compute {compute_ms:.2f} ms per token; per-hop overhead {hop_ms:.2f} ms over 3 hops (target <= 0.5)")
    print(f"(b) 4 concurrent streams {aggregate:6.1f} tok/s vs one stream {single:6.1f} tok/s: "
          f"{aggregate / single:.2f}x (target >= 1.5x)")
    print(f"machine: {os.cpu_count()} CPUs; runs {args.runs}; tokens {args.tokens}")


if __name__ == "__main__":
    main()
