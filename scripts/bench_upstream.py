"""Routed through the mesh to an upstream vs the upstream directly, in one run (issue 17).

Starts llama-cpp-python's own OpenAI server (`python -m llama_cpp.server`) on the embedded SmolLM2 GGUF,
node U fronting it (`--upstream`) and node G with no model; then alternates greedy streamed chat
completions: to the upstream directly, at U (relayed on U), and at G (G -> gRPC -> U -> upstream).
Reports per path the median TTFT and decode tok/s (content events after the first, over the time
after the first), and each mesh path against direct: tok/s ratio (target >= 0.95) and TTFT delta
(target <= +5 ms).

    python scripts/bench_upstream.py --rounds 20 --tokens 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.model_file import resolve_path  # noqa: E402
from scripts.bench_common import REPO, start_node, stop_nodes  # noqa: E402

SERVED = "smollm2"
PROMPT = "Tell me a long story about a lighthouse keeper and the sea."


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_models(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as resp:
                if SERVED in resp.read().decode():
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} does not list {SERVED}")


_count = iter(range(1 << 30))


def stream_chat(url: str, tokens: int) -> tuple[float, float, int]:
    """(TTFT s, decode tok/s, content events) of one greedy streamed chat completion. Each prompt ends
    with its own number (no path gets a whole prompt from cache); a number after which the model stops
    at once is skipped for the next."""
    for _ in range(10):
        try:
            return _stream_chat(url, tokens, f"{PROMPT} (story {next(_count)})")
        except EmptyAnswer:
            continue
    raise RuntimeError("no content streamed")


class EmptyAnswer(Exception):
    pass


def _stream_chat(url: str, tokens: int, prompt: str) -> tuple[float, float, int]:
    body = json.dumps({"model": SERVED, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
                       "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first = last = None
    n = 0
    with urllib.request.urlopen(req, timeout=600) as resp:
        for line in resp:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0].get("delta", {}).get("content"):
                last = time.perf_counter()
                first = first or last
                n += 1
    if first is None or last is None or n < 8:
        raise EmptyAnswer
    rate = (n - 1) / (last - first) if n > 1 and last > first else 0.0
    return first - start, rate, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads of the upstream")
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    args = ap.parse_args()

    gguf = resolve_path("smollm2-135m-instruct")[0]
    port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", SERVED, "--host",
         "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", str(args.threads),
         "--n_gpu_layers", str(args.n_gpu_layers), "--verbose", "False"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    direct = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            wait_models(direct)
            secret = f"bench-upstream-{time.time_ns()}"
            pu, pg = free_port(), free_port()
            procs.append(start_node("U", pu, tmp, "--upstream", direct, "--mesh-secret", secret))
            procs.append(start_node("G", pg, tmp, "--no-model", "--mesh-secret", secret))
            paths = {"direct": direct, "at U": f"http://127.0.0.1:{pu}", "at G (mesh)": f"http://127.0.0.1:{pg}"}
            wait_models(paths["at G (mesh)"])
            for url in paths.values():  # warm up
                stream_chat(url, 8)
            rows: dict[str, list[tuple[float, float, int]]] = {k: [] for k in paths}
            for r in range(args.rounds):
                order = list(paths.items())
                if r % 2:
                    order.reverse()
                for name, url in order:
                    rows[name].append(stream_chat(url, args.tokens))
        finally:
            stop_nodes(procs)
            upstream.terminate()
            upstream.wait()

    print(f"SmolLM2-135M Q4_1 behind llama_cpp.server ({args.threads} threads), {args.rounds} rounds x "
          f"{args.tokens} tokens, greedy streamed chat, paths alternating")
    base_ttft = statistics.median(t for t, _, _ in rows["direct"])
    base_rate = statistics.median(v for _, v, _ in rows["direct"])
    print(f"{'path':<14} {'TTFT ms p50':>12} {'tok/s p50':>10} {'tok/s ratio':>12} {'TTFT delta ms':>14}")
    for name, samples in rows.items():
        ttft = statistics.median(t for t, _, _ in samples)
        rate = statistics.median(v for _, v, _ in samples)
        print(f"{name:<14} {1000 * ttft:>12.1f} {rate:>10.1f} {rate / base_rate:>12.3f} "
              f"{1000 * (ttft - base_ttft):>+14.1f}")


if __name__ == "__main__":
    main()
