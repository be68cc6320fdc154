#!/usr/bin/env python3
"""The cost of metrics: two nodes side by side, one with metrics (the default) and one `--no-metrics`,
same model, threads and context; greedy streamed completions alternate between them. The metrics node
is also scraped (GET /metrics) after every one of its runs, as Prometheus would (more often, in fact).
Prints tok/s and TTFT p50 of each side and the ratio (target: metrics on / off >= 0.99).

    .venv/bin/python scripts/bench_metrics.py [--runs 9] [--tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.bench_common import start_node, stop_nodes, stream_completion  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--port", type=int, default=8794)
    args = ap.parse_args()
    common = ("--threads", str(args.threads), "--ctx-size", str(args.ctx))
    with tempfile.TemporaryDirectory() as data_dir:
        on = start_node("on", args.port, data_dir, *common, "--mesh-secret", "bench-metrics-on")
        off = start_node("off", args.port + 1, data_dir, *common, "--no-metrics", "--mesh-secret", "bench-metrics-off")
        urls = {"on": f"http://127.0.0.1:{args.port}", "off": f"http://127.0.0.1:{args.port + 1}"}
        scrape_ms: list[float] = []
        try:
            for url in urls.values():
                stream_completion(url, 8)  # warm-up both sides
            results: dict[str, list[tuple[float, float, int]]] = {"on": [], "off": []}
            for i in range(args.runs):
                for side in (("on", "off") if i % 2 == 0 else ("off", "on")):
                    results[side].append(stream_completion(urls[side], args.tokens)[:3])
                    if side == "on":
                        started = time.perf_counter()
                        with urllib.request.urlopen(urls["on"] + "/metrics", timeout=10) as resp:
                            resp.read()
                        scrape_ms.append((time.perf_counter() - started) * 1000)
        finally:
            stop_nodes([on, off])
    summary = {}
    for side, runs in results.items():
        toks = [n / total for _, total, n in runs]
        summary[side] = (statistics.median(toks), statistics.median(t * 1000 for t, _, _ in runs))
        print(f"metrics {side:3s}  tok/s p50 {summary[side][0]:7.1f}   TTFT p50 {summary[side][1]:6.1f} ms"
              f"   tokens {[n for _, _, n in runs]}")
    ratio = summary["on"][0] / summary["off"][0]
    print(f"metrics on/off tok/s ratio {ratio:.4f} (target >= 0.99); TTFT difference p50 "
          f"{summary['on'][1] - summary['off'][1]:+.1f} ms; one scrape of /metrics p50 {statistics.median(scrape_ms):.1f} ms")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; threads {args.threads}; "
          f"ctx {args.ctx}; runs {args.runs}")


if __name__ == "__main__":
    main()
