"""GPU decode of the torch engine against its limits (behind `bench_torch_engine.py gpu`).

ShardModel.decode on random weights of a preset's shapes: CUDA graphs against the same step eager,
int4 (quantized) against bf16, and HF transformers (static cache + torch.compile) on the same shapes,
with shares of a measured device copy bandwidth (weights and KV cache read per step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PRESETS = {  # n_layers, hidden, heads, kv heads, ffn, vocab, rope base
    "smollm2-135m": (30, 576, 9, 3, 1536, 49152, 100000.0),
    "llama3-8b": (32, 4096, 32, 8, 14336, 128256, 500000.0),
}


class _SyntheticLinears:
    """LinearFactory's interface, with random weights made on the device (no GGUF of 8B here)."""

    def __init__(self, form: str, device: torch.device) -> None:
        """form: "full" (bf16), "quantized" (tinygemm int4) or "quantized-triton" (engine/int4_triton.py)."""
        self.form, self.device, self.dtype = form, device, torch.bfloat16
        self.ggml = None
        self._g = torch.Generator(device=device).manual_seed(0)

    def __call__(self, parts, biases=()):  # noqa: ANN001, ANN204
        from engine.linear import DenseLinear, Int4Linear

        n, k = sum(p.rows for p in parts), parts[0].cols
        outs = tuple(p.rows for p in parts)
        if self.form == "full":
            w = torch.randn(n, k, device=self.device, generator=self._g, dtype=self.dtype) * 0.02
            return DenseLinear(w, None, outs)
        from engine.linear import pack_tinygemm

        q = torch.randint(0, 16, (n, k), device=self.device, generator=self._g, dtype=torch.int32)
        if self.form == "quantized-triton":
            from engine.int4_triton import pack_int4
            from engine.linear import TritonInt4Linear

            ones = torch.full((n, k // 32), 0.003, device=self.device, dtype=self.dtype)
            return TritonInt4Linear(pack_int4(q, ones, torch.zeros_like(ones)), outs, None)
        sz = torch.empty(k // 32, n, 2, device=self.device, dtype=self.dtype)
        sz[..., 0], sz[..., 1] = 0.003, 0.0
        return Int4Linear(pack_tinygemm(q), sz, outs, None)

    def vector(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, self.dtype)

    def embedding(self, raw):  # noqa: ANN001, ANN201
        from engine.linear import DenseEmbedding

        return DenseEmbedding(torch.randn(raw.rows, raw.cols, device=self.device, dtype=self.dtype))

    def head(self, raw, embedding):  # noqa: ANN001, ANN201
        return self([raw])


def synthetic_weights(preset: str):  # noqa: ANN201
    from shard.config import ModelConfig
    from shard.gguf_tensor import RawTensor
    from shard.loader import LayerWeights, ShardWeights
    from shard.spec import ShardSpec

    n, h, heads, kv, ffn, vocab, base = PRESETS[preset]
    d = h // heads
    c = ModelConfig("llama", n, h, heads, kv, d, ffn, vocab, 8192, base, d, 1e-5, True, False)

    def raw(rows: int, cols: int) -> RawTensor:  # shapes only: no bytes behind them
        return RawTensor("w", "Q4_0", rows, cols, np.broadcast_to(np.zeros(1, np.uint8), (rows, cols // 32 * 18)))

    def norm() -> torch.Tensor:
        return 1 + 0.1 * torch.randn(h)

    layers = [
        LayerWeights(norm(), raw(h, h), raw(kv * d, h), raw(kv * d, h), raw(h, h), norm(),
                     raw(ffn, h), raw(ffn, h), raw(h, ffn))
        for _ in range(n)
    ]
    embd = raw(vocab, h)
    return ShardWeights(c, ShardSpec("synthetic", 0, n, n), layers, embd, norm(), embd, None)


def _copy_bandwidth(dev: torch.device) -> float:
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - t0)  # read + write


def _kv_bytes_per_token(model) -> int:  # noqa: ANN001
    c = model.config
    return 2 * len(model.layers) * c.n_kv_heads * c.head_dim * model.kv_dtype.itemsize


def _time_decode(model, slots: list[int], start: int, tokens: int) -> float:  # noqa: ANN001
    """Seconds per batched decode step at positions start.. (3 warm-up steps first, which also capture
    the bucket's graph); the positions are rewritten on each call, so every batch reads the same cache."""
    x = torch.randint(0, 1000, (len(slots),))
    for step in range(3):
        model.decode(slots, x, [start + step] * len(slots))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for step in range(tokens):
        model.decode(slots, x, [start + 3 + step] * len(slots))
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / tokens


def bench_gpu(
    preset: str, tokens: int, batches: list[int], context: int, hf_batches: list[int],
    forms: tuple[str, ...] = ("full", "quantized", "quantized-triton"), eager: bool = True,
    pdl: tuple[str, ...] = ("on",), isolate: bool = True, results_path: str | None = None,
) -> None:  # fmt: skip
    """ShardModel.decode, CUDA graphs against the same fixed-shape step eager, bf16 and int4, against
    HF transformers (static cache + torch.compile) on the same shapes; shares of the measured copy
    bandwidth count the weights and the KV cache each step reads. `pdl` ("on", "off" or both) sets
    MESHLLM_PDL (engine/pdl.py) for each model built; with both, each form runs twice.

    `isolate`: each form in a process of its own, as a node holds one form. In one process the int4
    step after bf16's 15 GB came and went ran 2.83 or 3.01-3.02 ms by run, alone 2.83-2.88 in four."""
    from engine.torch_model import ShardModel

    dev = torch.device("cuda")
    bw = _copy_bandwidth(dev)
    print(f"{preset} on {torch.cuda.get_device_name(dev)}, torch {torch.__version__}; "
          f"copy bandwidth {bw / 1e12:.2f} TB/s; {context} tokens cached per session, {tokens} steps timed")
    results: dict[tuple[str, int], float] = {}
    labels = {"full": "bf16", "quantized": "int4", "quantized-triton": "int4-triton"}
    runs = [(form, mode) for form in forms for mode in pdl]
    if isolate and len(runs) > 1:
        for form, pdl_mode in runs:
            results.update(_isolated(preset, tokens, batches, context, form, pdl_mode, eager))
        runs = []
    for form, pdl_mode in runs:
        os.environ["MESHLLM_PDL"] = "1" if pdl_mode == "on" else "0"
        model = ShardModel(synthetic_weights(preset), _SyntheticLinears(form, dev),  # type: ignore[arg-type]
                           max_sessions=max(batches), max_context=context + tokens + 8)
        weight_bytes = sum(la.qkv.nbytes + la.wo.nbytes + la.gate_up.nbytes + la.down.nbytes
                           for la in model.layers) + model.output.nbytes  # type: ignore[union-attr]
        kv_token = _kv_bytes_per_token(model)
        label = labels[form] + ("-nopdl" if pdl_mode == "off" else "")
        print(f"  {label}: {weight_bytes / 1e9:.2f} GB of weights per step; batch-1 roofline "
              f"{bw / (weight_bytes + context * kv_token):.0f} tok/s")
        for s in range(max(batches)):
            model.prefill(s, torch.randint(0, 1000, (context,)), 0, last="none")
        graphs = model.graphs
        for batch in batches:
            slots = list(range(batch))
            step_bytes = weight_bytes + batch * context * kv_token
            for mode in ("graph", "eager") if eager else ("graph",):
                model.graphs = graphs if mode == "graph" else None
                dt = _time_decode(model, slots, context, tokens)
                results[f"{label}-{mode}", batch] = batch / dt
                print(f"    batch {batch:3d} {mode:5s}: {1000 * dt:6.2f} ms/step {batch / dt:8.1f} tok/s  "
                      f"{step_bytes / dt / bw:5.1%} of the copy bandwidth")
        model.graphs = graphs
        del model
        torch.cuda.empty_cache()
    if results_path:
        with open(results_path, "w") as f:
            json.dump([[label, batch, v] for (label, batch), v in results.items()], f)
    for batch in hf_batches:
        try:
            results["hf", batch] = _hf_static_compile(preset, batch, context, tokens)
            print(f"  HF transformers static cache + compile, batch {batch:3d}: {results['hf', batch]:8.1f} tok/s")
        except Exception as e:  # noqa: BLE001 - the reference is optional; say why it is missing
            print(f"  HF transformers batch {batch}: not measured ({type(e).__name__}: {str(e)[:200]})")
        torch.cuda.empty_cache()
    print("  ratios (graph):")
    for batch in batches:
        line = f"    batch {batch:3d}:"
        if ("bf16-eager", batch) in results:
            line += f" bf16 graph/eager {results['bf16-graph', batch] / results['bf16-eager', batch]:.2f}x"
        if ("bf16-nopdl-graph", batch) in results and ("bf16-graph", batch) in results:
            line += f" bf16 PDL on/off {results['bf16-graph', batch] / results['bf16-nopdl-graph', batch]:.3f}x"
        for q in ("int4", "int4-triton"):
            if (f"{q}-graph", batch) in results and ("bf16-graph", batch) in results:
                line += f"  {q}/bf16 {results[f'{q}-graph', batch] / results['bf16-graph', batch]:.2f}x"
        if ("hf", batch) in results and ("bf16-graph", batch) in results:
            line += f"  bf16/HF {results['bf16-graph', batch] / results['hf', batch]:.2f}x"
        print(line)


def _isolated(preset: str, tokens: int, batches: list[int], context: int, form: str, pdl_mode: str,
              eager: bool) -> dict[tuple[str, int], float]:
    """One form measured by `bench_torch_engine.py gpu` in a process of its own; its tok/s by (label, batch)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "results.json")
        cmd = [sys.executable, str(Path(__file__).resolve().parent / "bench_torch_engine.py"), "gpu", "--preset",
               preset, "--tokens", str(tokens), "--context", str(context), "--batches", *map(str, batches),
               "--hf-batches", "--forms", form, "--pdl", pdl_mode, "--results", path, *(() if eager else ("--no-eager",))]
        subprocess.run(cmd, check=True)
        with open(path) as f:
            return {(label, batch): v for label, batch, v in json.load(f)}


def _hf_static_compile(preset: str, batch: int, context: int, tokens: int) -> float:
    """Decode tok/s of HF transformers' Llama with random bf16 weights of the preset's shapes, a
    StaticCache and the decode forward under torch.compile(mode="reduce-overhead"): HF's documented
    static-cache recipe, driven step by step (greedy ids stay on the device)."""
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    n, h, heads, kv, ffn, vocab, base = PRESETS[preset]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=ffn, num_hidden_layers=n, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, rope_theta=base,
                      max_position_embeddings=context + tokens + 64)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    length = context + tokens + 16
    try:
        cache = StaticCache(config=cfg, max_batch_size=batch, max_cache_len=length, device="cuda",
                            dtype=torch.bfloat16)
    except TypeError:  # newer transformers size the batch on first use
        cache = StaticCache(config=cfg, max_cache_len=length)
    ids = torch.randint(0, 1000, (batch, context), device="cuda")
    step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    with torch.inference_mode():
        out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(context, device="cuda"),
                    use_cache=True)
        x = out.logits[:, -1:].argmax(-1)

        def run(start: int, count: int) -> torch.Tensor:
            nonlocal x
            for i in range(count):
                pos = torch.tensor([start + i], device="cuda")
                x = step(input_ids=x, past_key_values=cache, cache_position=pos, use_cache=True).logits.argmax(-1)
            return x

        run(context, 4)  # compile and capture
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(context + 4, tokens)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / tokens
    return batch / dt
