"""Greedy decode speed of the whole-model TorchShardEngine, single stream and N concurrent streams.

    .venv/bin/python scripts/bench_torch_engine.py [--threads 2] [--tokens 64] [--streams 4]
    python3 scripts/bench_torch_engine.py --synthetic llama3-8b --device cuda   # GPU, random weights

Prints tok/s and the weight bandwidth it implies (decode reads every weight once per step).
`--synthetic` times ShardModel.decode on random weights of a preset's shapes (no GGUF, no tokenizer),
and checks the device's output against fp32 on CPU for a small preset.
"""

from __future__ import annotations

import argparse
import platform
import threading
import time

import torch

from engine.torch_model import ShardModel
from shard.config import ModelConfig
from shard.loader import LayerWeights, ShardWeights, default_dtype
from shard.memory import shard_weight_params
from shard.spec import ShardSpec

PRESETS = {  # n_layers, hidden, heads, kv heads, ffn, vocab, rope base
    "smollm2-135m": (30, 576, 9, 3, 1536, 49152, 100000.0),
    "llama3-8b": (32, 4096, 32, 8, 14336, 128256, 500000.0),
}

PROMPT = "<|im_start|>user\nTell me a long story about a dragon.<|im_end|>\n<|im_start|>assistant\n"


def _stream(engine, n: int, seed: int) -> tuple[int, float]:  # noqa: ANN001
    """Returns (tokens generated, seconds from the first token to the last)."""
    from engine.types import GenerationRequest, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=n)
    req = GenerationRequest(f"bench{seed}", params, prompt=PROMPT + "Chapter " + str(seed))
    first = None
    count = 0
    for chunk in engine.generate(req, threading.Event()):
        if chunk.token_ids:
            count += 1
            first = first or time.perf_counter()
    return count, time.perf_counter() - (first or time.perf_counter())


def synthetic_weights(
    preset: str, device: str, dtype: torch.dtype, seed: int = 0, *, on_device: bool = False
) -> ShardWeights:
    """Random weights of a preset's shapes; drawn on `device` when `on_device` (8B on CPU is slow)."""
    n, h, heads, kv, ffn, vocab, base = PRESETS[preset]
    d = h // heads
    c = ModelConfig("llama", n, h, heads, kv, d, ffn, vocab, 8192, base, d, 1e-5, True, False)
    gen_device = device if on_device else "cpu"
    g = torch.Generator(device=gen_device).manual_seed(seed)

    def w(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=gen_device) * std).to(device, dtype)

    layers = [
        LayerWeights(
            w(h, std=0.1) + 1,
            w(h, h),
            w(kv * d, h),
            w(kv * d, h),
            w(h, h),
            w(h, std=0.1) + 1,
            w(ffn, h),
            w(ffn, h),
            w(h, ffn),
        )
        for _ in range(n)
    ]
    embd = w(vocab, h, std=1.0)
    return ShardWeights(c, ShardSpec("synthetic", 0, n, n), layers, embd, w(h, std=0.1) + 1, embd, None)


def bench_synthetic(preset: str, device: str, tokens: int) -> None:
    dev = torch.device(device)
    dtype = default_dtype(dev)
    if preset == "smollm2-135m" or dev.type == "cuda":  # device output against fp32 on CPU
        cpu = ShardModel(
            synthetic_weights("smollm2-135m", "cpu", torch.float32), max_sessions=4, max_context=256
        )
        dm = ShardModel(synthetic_weights("smollm2-135m", device, dtype), max_sessions=4, max_context=256)
        ids = torch.randint(0, 49152, (4, 17), generator=torch.Generator().manual_seed(1))
        for m in (cpu, dm):
            for b in range(4):
                m.prefill(b, ids[b, :16], 0)
        ref = cpu.decode([0, 1, 2, 3], ids[:, 16], [16] * 4)
        out = dm.decode([0, 1, 2, 3], ids[:, 16], [16] * 4).cpu()
        cos = torch.nn.functional.cosine_similarity(ref, out).min().item()
        same = (ref.argmax(-1) == out.argmax(-1)).float().mean().item()
        print(
            f"{device} {dtype} vs cpu fp32 (batched decode, smollm2 shapes): min cosine {cos:.5f}, top-1 agree {same:.0%}"
        )
        del cpu, dm
    weights = synthetic_weights(preset, device, dtype, on_device=True)
    weight_bytes = shard_weight_params(weights.config, weights.spec) * dtype.itemsize
    model = ShardModel(weights, max_sessions=64, max_context=1024)
    del weights
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.machine()
    print(f"{preset} on {name}, {dtype}, weights {weight_bytes / 1e9:.2f} GB")
    for batch in (1, 4, 16, 64):
        slots = list(range(batch))
        for s in slots:
            model.prefill(s, torch.randint(0, 1000, (32,)), 0)
        x = torch.randint(0, 1000, (batch,))
        for step in range(3):  # warm up
            model.decode(slots, x, [32 + step] * batch)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for step in range(tokens):
            model.decode(slots, x, [35 + step] * batch)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / tokens
        print(
            f"  batch {batch:2d}: {1000 * dt:6.2f} ms/step, {batch / dt:8.1f} tok/s, "
            f"{weight_bytes / dt / 1e9:7.1f} GB/s of weights"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic", choices=sorted(PRESETS))
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads) if args.device == "cpu" else None
    if args.synthetic:
        bench_synthetic(args.synthetic, args.device, args.tokens)
        return
    from engine.model_file import load_model_file  # these need llama-cpp-python and the GGUF
    from engine.torch_engine import TorchShardEngine

    model = load_model_file(args.model)
    t0 = time.perf_counter()
    engine = TorchShardEngine(
        model, device=args.device, threads=args.threads, max_sessions=args.streams, max_context=512
    )
    print(
        f"load {time.perf_counter() - t0:.1f} s; {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {engine.shard.dtype}"
    )
    weight_bytes = shard_weight_params(engine.config, engine.spec) * engine.shard.dtype.itemsize
    _stream(engine, 8, 0)  # warm up
    n, dt = _stream(engine, args.tokens, 1)
    single = (n - 1) / dt
    print(
        f"1 stream: {single:.1f} tok/s ({1000 / single:.1f} ms/token, "
        f"{single * weight_bytes / 1e9:.1f} GB/s of weights)"
    )
    results: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    threads = [
        threading.Thread(target=lambda i=i: results.append(_stream(engine, args.tokens, i + 2)))
        for i in range(args.streams)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    total = sum(n for n, _ in results)
    print(
        f"{args.streams} streams: {total / wall:.1f} tok/s aggregate (incl. prefill), "
        f"{total / wall / single:.2f}x one stream"
    )
    engine.close()


if __name__ == "__main__":
    main()
