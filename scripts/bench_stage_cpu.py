#!/usr/bin/env python3
"""Where a CPU pipeline's time goes (issue 12's 4-streams-through-2-stages target), in one run.

(1) A stage's decode step on the real SmolLM2 file (layers 0-15, one thread) at batch 1, 2 and 4,
    and the time ggml's compute takes of it, in three modes alternating: the engine's (ggml graphs
    cached, each row multiplied on its own for batch invariance), graphs built per call (the graph
    cache's A/B), and one M-row product.
(2) The 2-stage pipeline of `scripts/bench_pipeline.py` (gateway + 2 stage processes, mTLS), one
    stream then 4 concurrent streams of 64 tokens: tok/s, each process's CPU seconds from /proc, and
    the stages' own decode-step counters: how busy two cores are, and how much CPU a token costs
    outside the forward pass.

    .venv/bin/python scripts/bench_stage_cpu.py [--steps 25] [--rounds 5] [--steps-only] [--base-port 8970]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_common import DATA_PLANE_FLAGS, MODEL, PROMPT, start_node, stop_nodes  # noqa: E402
from scripts.bench_pipeline import _wait_pipeline, decode_rate  # noqa: E402


def stage_steps(steps: int, rounds: int) -> None:
    import engine.ggml_cpu as ggml_cpu
    from engine.model_file import load_model_file
    from engine.torch_engine import TorchShardEngine
    from shard.spec import ShardSpec

    torch.set_num_threads(1)
    m = load_model_file("smollm2-135m-instruct")
    engine = TorchShardEngine(m, spec=ShardSpec(m.digest, 0, 15, m.n_layers), threads=1, max_sessions=4,
                              max_context=512)
    shard = engine.shard
    ids = torch.randint(0, 1000, (4,))
    pos = [40] * 4  # each session's next position: a step always reads a cache written up to it
    for s in range(4):
        shard.prefill(s, torch.randint(0, 1000, (pos[s],)), 0, last="none")

    def step(b: int) -> None:
        shard.decode(list(range(b)), ids[:b], pos[:b])
        pos[:b] = [p + 1 for p in pos[:b]]

    # time inside ggml's graph compute, the rest of a step being Python and torch around it
    ggml_s = [0.0]
    compute = ggml_cpu.GgmlCpu._compute

    def timed(self: ggml_cpu.GgmlCpu, graph: int) -> None:
        t = time.perf_counter()
        compute(self, graph)
        ggml_s[0] += time.perf_counter() - t

    # (cache graphs, rows multiplied one by one): the engine's mode, graphs built per call (the A/B of
    # the graph cache), and one M-row product (what batch invariance costs)
    rows_default, cache_default = ggml_cpu.ROW_INVARIANT_ROWS, ggml_cpu.GRAPH_CACHE
    modes = {"graphs cached, row by row": (True, rows_default), "graphs built per call": (False, rows_default),
             "graphs cached, one M-row product": (True, 1)}
    runs: dict[tuple[str, int], list[tuple[float, float]]] = {}  # (mode, batch) -> [(step ms, ggml ms)]
    ggml_cpu.GgmlCpu._compute = timed  # type: ignore[method-assign]
    try:
        for _ in range(rounds):  # modes alternate within each round: a busy neighbour hits them all
            for mode, (cache, rows) in modes.items():
                ggml_cpu.GRAPH_CACHE, ggml_cpu.ROW_INVARIANT_ROWS = cache, rows
                for b in (1, 2, 4):
                    pos[:] = [40] * 4  # every mode and batch attends over the same lengths
                    for _ in range(3):
                        step(b)
                    ggml_s[0] = 0.0
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        step(b)
                    runs.setdefault((mode, b), []).append(
                        ((time.perf_counter() - t0) / steps * 1000, ggml_s[0] / steps * 1000))
    finally:
        ggml_cpu.GgmlCpu._compute = compute  # type: ignore[method-assign]
        ggml_cpu.GRAPH_CACHE, ggml_cpu.ROW_INVARIANT_ROWS = cache_default, rows_default
    print(f"stage 0-15 decode step, medians of {rounds} alternating rounds of {steps} steps (ggml: time in its compute)")
    for mode in modes:
        med = {b: (statistics.median(t for t, _ in runs[mode, b]), statistics.median(g for _, g in runs[mode, b]))
               for b in (1, 2, 4)}
        print(f"  {mode:32s}: " + ", ".join(
            f"batch {b} {t:.2f} ms ({t / med[1][0]:.2f}x, ggml {g:.2f} ms = {g / t:.0%})" for b, (t, g) in med.items()))
    engine.close()


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/mesh/self") as resp:
        return json.loads(resp.read())["pipeline"]


def _one_stream(url: str, i: int, counts: list[int]) -> None:
    counts.append(decode_rate(url, 64, f"{PROMPT} (story {i})")[1])


def pipeline(base: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        flags = ("--mesh-secret", "stage-cpu-" + secrets.token_hex(4), *DATA_PLANE_FLAGS["mtls"])
        procs = [start_node("G", base + 1, d, "--no-model", *flags),
                 start_node("S0", base + 2, d, "--shard", f"{MODEL}:0-15", "--threads", "1", *flags),
                 start_node("S1", base + 3, d, "--shard", f"{MODEL}:15-30", "--threads", "1", *flags)]
        try:
            g = f"http://127.0.0.1:{base + 1}"
            _wait_pipeline(g)
            decode_rate(g, 8)
            for streams in (1, 4):
                cpu0 = [_cpu_s(p.pid) for p in procs]
                st0 = [_stats(f"http://127.0.0.1:{base + i}") for i in (2, 3)]
                counts: list[int] = []
                threads = [threading.Thread(target=_one_stream, args=(g, i, counts)) for i in range(streams)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                cpu = [_cpu_s(p.pid) - c for p, c in zip(procs, cpu0, strict=True)]
                st1 = [_stats(f"http://127.0.0.1:{base + i}") for i in (2, 3)]
                tokens = sum(counts)
                print(f"{streams} stream(s): {tokens / wall:.1f} tok/s end to end; CPU s gateway {cpu[0]:.2f}, "
                      f"stage 0 {cpu[1]:.2f}, stage 1 {cpu[2]:.2f}: {sum(cpu) / wall / (os.cpu_count() or 1):.0%} of "
                      f"{os.cpu_count()} cores; stage CPU per token {1000 * cpu[1] / tokens:.1f} / {1000 * cpu[2] / tokens:.1f} ms")
                for name, a, b in zip(("stage 0", "stage 1"), st0, st1, strict=True):
                    n = b["decode_steps"] - a["decode_steps"]
                    ms = b["decode_steps"] * b["decode_step_ms"] - a["decode_steps"] * a["decode_step_ms"]
                    print(f"    {name}: {n} session steps, {ms / max(1, n):.2f} ms each as its session waited")
        finally:
            stop_nodes(procs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--base-port", type=int, default=8970)
    ap.add_argument("--steps-only", action="store_true", help="(1) only: the stage's decode steps")
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    stage_steps(args.steps, args.rounds)
    if not args.steps_only:
        pipeline(args.base_port)


if __name__ == "__main__":
    main()
