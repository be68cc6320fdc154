"""Greedy decode speed of the whole-model TorchShardEngine, single stream and N concurrent streams.

    .venv/bin/python scripts/bench_torch_engine.py [--threads 2] [--tokens 64] [--streams 4]

Prints tok/s and the weight bandwidth it implies (decode reads every weight once per step).
"""

from __future__ import annotations

import argparse
import platform
import threading
import time

import torch

from engine.model_file import load_model_file
from engine.torch_engine import TorchShardEngine
from engine.types import GenerationRequest, SamplingParams
from shard.memory import shard_weight_params

PROMPT = "<|im_start|>user\nTell me a long story about a dragon.<|im_end|>\n<|im_start|>assistant\n"


def _stream(engine: TorchShardEngine, n: int, seed: int) -> tuple[int, float]:
    """Returns (tokens generated, seconds from the first token to the last)."""
    params = SamplingParams(temperature=0, max_tokens=n)
    req = GenerationRequest(f"bench{seed}", params, prompt=PROMPT + "Chapter " + str(seed))
    first = None
    count = 0
    for chunk in engine.generate(req, threading.Event()):
        if chunk.token_ids:
            count += 1
            first = first or time.perf_counter()
    return count, time.perf_counter() - (first or time.perf_counter())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    model = load_model_file(args.model)
    t0 = time.perf_counter()
    engine = TorchShardEngine(model, device=args.device, threads=args.threads, max_sessions=args.streams, max_context=512)
    print(f"load {time.perf_counter() - t0:.1f} s; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {engine.shard.dtype}")
    weight_bytes = shard_weight_params(engine.config, engine.spec) * engine.shard.dtype.itemsize
    _stream(engine, 8, 0)  # warm up
    n, dt = _stream(engine, args.tokens, 1)
    single = (n - 1) / dt
    print(f"1 stream: {single:.1f} tok/s ({1000 / single:.1f} ms/token, "
          f"{single * weight_bytes / 1e9:.1f} GB/s of weights)")
    results: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    threads = [threading.Thread(target=lambda i=i: results.append(_stream(engine, args.tokens, i + 2)))
               for i in range(args.streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    total = sum(n for n, _ in results)
    print(f"{args.streams} streams: {total / wall:.1f} tok/s aggregate (incl. prefill), "
          f"{total / wall / single:.2f}x one stream")
    engine.close()


if __name__ == "__main__":
    main()
