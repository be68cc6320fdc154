#!/usr/bin/env python3
"""Gateway overhead: llama-cpp-python in-process against the same model through a node's HTTP API.

Alternates (a) direct and (b) HTTP, greedy completions of the same prompt, same threads and context.
Prints tok/s and TTFT p50 of each side and the ratio.

    .venv/bin/python scripts/bench_gateway.py [--runs 5] [--tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.bench_common import PROMPT, start_node, stop_nodes, stream_completion  # noqa: E402


def direct_run(llm, tokens: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    ttft = None
    n = 0
    for chunk in llm.create_completion(PROMPT, max_tokens=tokens, temperature=0, stream=True):
        if not chunk["choices"][0]["text"]:
            continue  # the closing chunk carries only finish_reason
        if ttft is None:
            ttft = time.perf_counter() - start
        n += 1
    total = time.perf_counter() - start
    return ttft or total, total, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--port", type=int, default=8790)
    args = ap.parse_args()

    import llama_cpp

    from engine.model_file import load_model_file

    model = load_model_file("smollm2-135m-instruct")
    llm = llama_cpp.Llama(model.path, n_ctx=args.ctx, n_threads=args.threads, n_threads_batch=args.threads,
                          n_batch=512, verbose=False)
    with tempfile.TemporaryDirectory() as data_dir:
        node = start_node("bench", args.port, data_dir, "--threads", str(args.threads), "--ctx-size", str(args.ctx))
        try:
            url = f"http://127.0.0.1:{args.port}"
            direct_run(llm, 8), stream_completion(url, 8)  # warm-up both sides
            results: dict[str, list[tuple[float, float, int]]] = {"direct": [], "http": []}
            for _ in range(args.runs):
                results["direct"].append(direct_run(llm, args.tokens))
                results["http"].append(stream_completion(url, args.tokens)[:3])
        finally:
            stop_nodes([node])
    summary = {}
    for side, runs in results.items():
        toks = [n / total for _, total, n in runs]
        summary[side] = {
            "tok_s_p50": statistics.median(toks),
            "ttft_ms_p50": statistics.median(t * 1000 for t, _, _ in runs),
            "tokens": [n for _, _, n in runs],
        }
        print(f"{side:7s} tok/s p50 {summary[side]['tok_s_p50']:7.1f}   TTFT p50 {summary[side]['ttft_ms_p50']:6.1f} ms"
              f"   tokens {summary[side]['tokens']}")
    ratio = summary["http"]["tok_s_p50"] / summary["direct"]["tok_s_p50"]
    overhead = summary["http"]["ttft_ms_p50"] - summary["direct"]["ttft_ms_p50"]
    print(f"HTTP/direct tok/s ratio {ratio:.3f} (target >= 0.95); TTFT overhead p50 {overhead:+.1f} ms (target <= 5)")
    print(f"machine: {os.cpu_count()} CPUs; threads {args.threads}; ctx {args.ctx}; runs {args.runs}")


if __name__ == "__main__":
    main()
