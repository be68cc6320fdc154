"""The torch engine against its limits, both sides of each comparison in one run.

    .venv/bin/python scripts/bench_torch_engine.py memory             # node RSS: torch vs llama.cpp
    .venv/bin/python scripts/bench_torch_engine.py cpu [--threads 2]  # decode tok/s vs llama.cpp, same GGUF
    python scripts/bench_torch_engine.py gpu --preset llama3-8b       # H200: graphs vs eager, int4 vs bf16, vs HF
    python scripts/bench_torch_engine.py gpu-engine --model PATH      # H200: generate at 1 and 32 streams
    .venv/bin/python scripts/bench_torch_engine.py parity smollm2-135m-instruct PATH.gguf  # vs llama.cpp

memory: starts a `--engine torch` node and a llama.cpp node on the same GGUF with `--ctx-size 2048`,
sends each one request, and reads VmRSS of each process.
cpu: greedy decode of the same prompt through TorchShardEngine (quantized and full weights) and
LlamaCppEngine with the same thread count, on SmolLM2 and on a synthetic Llama-1B GGUF
(scripts/synthetic_gguf.py), reporting tok/s, the weight bytes each token reads, and ratios.
gpu: ShardModel.decode on random weights of a preset's shapes: CUDA graphs against the same step eager,
int4 (quantized) against bf16, and HF transformers (static cache + torch.compile) on the same shapes,
with shares of a measured device copy bandwidth (weights and KV cache read per step).
gpu-engine: TorchShardEngine.generate on CUDA with 1 and N concurrent streams (threads), text out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

PROMPT = "<|im_start|>user\nTell me a long story about a dragon.<|im_end|>\n<|im_start|>assistant\n"


# -- memory ---------------------------------------------------------------------------------------


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def bench_memory(model: str, kv_sessions: int) -> None:
    from scripts.bench_common import start_node, stop_nodes, stream_completion

    with tempfile.TemporaryDirectory() as tmp:
        sides = [("llama.cpp", ()), ("torch", ("--engine", "torch", "--kv-sessions", str(kv_sessions)))]
        rss = {}
        for i, (name, extra) in enumerate(sides):
            port = 18650 + i
            proc = start_node(name.replace(".", ""), port, tmp, "--model", model, "--ctx-size", "2048",
                              "--threads", "2", "--no-mdns", *extra)
            try:
                url = f"http://127.0.0.1:{port}"
                with urllib.request.urlopen(url + "/v1/models", timeout=30) as resp:
                    alias = json.loads(resp.read())["data"][0]["id"]
                stream_completion(url, 32, model=alias)
                rss[name] = _rss(proc.pid)
            finally:
                stop_nodes([proc])
    ratio = rss["torch"] / rss["llama.cpp"]
    print(f"{model}, --ctx-size 2048, after one 32-token request (torch: --kv-sessions {kv_sessions})")
    for name, b in rss.items():
        print(f"  {name:10s} RSS {b / 2**20:7.0f} MiB")
    print(f"  torch / llama.cpp = {ratio:.2f}x (target <= 1.5x)")


# -- CPU speed ------------------------------------------------------------------------------------


def _decode_tok_s(gen, n: int) -> float:  # noqa: ANN001 - an iterator of chunks or ids
    first, count = None, 0
    for _ in gen:
        count += 1
        if count == 1:
            first = time.perf_counter()
        if count > n:
            break
    assert first is not None
    return (count - 1) / (time.perf_counter() - first)


def _torch_side(model, form: str, threads: int, tokens: int) -> tuple[float, int]:  # noqa: ANN001
    from engine.torch_engine import TorchShardEngine
    from engine.types import GenerationRequest, SamplingParams
    from shard.footprint import model_weight_bytes

    engine = TorchShardEngine(model, threads=threads, max_sessions=1, max_context=512, weights=form)
    req = GenerationRequest("b", SamplingParams(temperature=0, max_tokens=tokens + 1), prompt=PROMPT)
    _decode_tok_s(engine.generate(req, threading.Event()), 4)  # warm up
    tok_s = _decode_tok_s(engine.generate(req, threading.Event()), tokens)
    w = model_weight_bytes(model.path, model.n_layers, form, "cpu")
    per_token = sum(w.layers) + w.head  # every layer and the head are read once per token
    engine.close()
    return tok_s, per_token


def _llama_side(model, threads: int, tokens: int) -> float:  # noqa: ANN001
    import llama_cpp

    llm = llama_cpp.Llama(model.path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    ids = llm.tokenize(PROMPT.encode(), special=True)
    _decode_tok_s(llm.generate(ids, temp=0), 4)
    llm.reset()
    return _decode_tok_s(llm.generate(ids, temp=0), tokens)


def bench_cpu(threads: int, tokens: int, synthetic: bool) -> None:
    from engine.model_file import load_model_file

    torch.set_num_threads(threads)
    files = [load_model_file("smollm2-135m-instruct")]
    tmp = tempfile.mkdtemp()
    if synthetic:
        from scripts.synthetic_gguf import write_synthetic_llama

        path = write_synthetic_llama(Path(tmp) / "llama-1b-q4_1.gguf", "llama-1b", "Q4_1")
        files.append(load_model_file(str(path), Path(tmp)))
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {threads} threads, "
          f"{tokens} greedy tokens after a warm-up")
    for model in files:
        llama = _llama_side(model, threads, tokens)
        print(f"{model.alias} ({model.size_bytes / 1e6:.0f} MB file): llama.cpp {llama:.1f} tok/s")
        for form in ("quantized", "full"):
            tok_s, per_token = _torch_side(model, form, threads, tokens)
            print(f"  torch {form:9s} {tok_s:6.1f} tok/s  {tok_s / llama:5.2f}x llama.cpp  "
                  f"{per_token / 1e6:6.0f} MB/token  {tok_s * per_token / 1e9:5.1f} GB/s of weights")


# -- parity ---------------------------------------------------------------------------------------

PARITY_PROMPTS = {  # the model's own chat markup, rendered by hand so both engines get the same ids
    "llama": "<|im_start|>user\nTell me a long story about a dragon and a knight.<|im_end|>\n<|im_start|>assistant\n",
    "gemma3": "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n",
}


def bench_parity(models: list[str], threads: int) -> None:
    """Last-position prompt logits of the torch engine (both weight forms) against llama.cpp."""
    import llama_cpp

    from engine.model_file import load_model_file
    from engine.torch_engine import TorchShardEngine

    torch.set_num_threads(threads)
    for name in models:
        m = load_model_file(name)
        llm = llama_cpp.Llama(m.path, n_ctx=512, logits_all=True, verbose=False, n_threads=threads)
        ids = llm.tokenize(PARITY_PROMPTS[m.architecture].encode(), special=True)
        llm.eval(ids)
        ref = np.array(llm.scores[len(ids) - 1])
        for form in ("quantized", "full"):
            e = TorchShardEngine(m, max_sessions=1, max_context=512, weights=form, threads=threads)
            out = e.shard.prefill(0, torch.tensor(ids), 0).float().numpy()[0]
            cos = float(out @ ref / np.linalg.norm(out) / np.linalg.norm(ref))
            print(f"{m.alias} {form:9s} same top-1: {out.argmax() == ref.argmax()}  cosine {cos:.5f}  "
                  f"max abs diff {np.abs(out - ref).max():.2f}")
            e.close()


# -- GPU ------------------------------------------------------------------------------------------

PRESETS = {  # n_layers, hidden, heads, kv heads, ffn, vocab, rope base
    "smollm2-135m": (30, 576, 9, 3, 1536, 49152, 100000.0),
    "llama3-8b": (32, 4096, 32, 8, 14336, 128256, 500000.0),
}


class _SyntheticLinears:
    """LinearFactory's interface, with random weights made on the device (no GGUF of 8B here)."""

    def __init__(self, form: str, device: torch.device) -> None:
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


def bench_gpu(preset: str, tokens: int, batches: list[int], context: int, hf_batches: list[int]) -> None:
    """ShardModel.decode, CUDA graphs against the same fixed-shape step eager, bf16 and int4, against
    HF transformers (static cache + torch.compile) on the same shapes; shares of the measured copy
    bandwidth count the weights and the KV cache each step reads."""
    from engine.torch_model import ShardModel

    dev = torch.device("cuda")
    bw = _copy_bandwidth(dev)
    print(f"{preset} on {torch.cuda.get_device_name(dev)}, torch {torch.__version__}; "
          f"copy bandwidth {bw / 1e12:.2f} TB/s; {context} tokens cached per session, {tokens} steps timed")
    results: dict[tuple[str, int], float] = {}
    for form in ("full", "quantized"):
        model = ShardModel(synthetic_weights(preset), _SyntheticLinears(form, dev),  # type: ignore[arg-type]
                           max_sessions=max(batches), max_context=context + tokens + 8)
        weight_bytes = sum(la.qkv.nbytes + la.wo.nbytes + la.gate_up.nbytes + la.down.nbytes
                           for la in model.layers) + model.output.nbytes  # type: ignore[union-attr]
        kv_token = _kv_bytes_per_token(model)
        label = "bf16" if form == "full" else "int4"
        print(f"  {label}: {weight_bytes / 1e9:.2f} GB of weights per step; batch-1 roofline "
              f"{bw / (weight_bytes + context * kv_token):.0f} tok/s")
        for s in range(max(batches)):
            model.prefill(s, torch.randint(0, 1000, (context,)), 0, last="none")
        graphs = model.graphs
        for batch in batches:
            slots = list(range(batch))
            step_bytes = weight_bytes + batch * context * kv_token
            for mode in ("graph", "eager"):
                model.graphs = graphs if mode == "graph" else None
                dt = _time_decode(model, slots, context, tokens)
                results[f"{label}-{mode}", batch] = batch / dt
                print(f"    batch {batch:3d} {mode:5s}: {1000 * dt:6.2f} ms/step {batch / dt:8.1f} tok/s  "
                      f"{step_bytes / dt / bw:5.1%} of the copy bandwidth")
        model.graphs = graphs
        del model
        torch.cuda.empty_cache()
    for batch in hf_batches:
        try:
            results["hf", batch] = _hf_static_compile(preset, batch, context, tokens)
            print(f"  HF transformers static cache + compile, batch {batch:3d}: {results['hf', batch]:8.1f} tok/s")
        except Exception as e:  # noqa: BLE001 - the reference is optional; say why it is missing
            print(f"  HF transformers batch {batch}: not measured ({type(e).__name__}: {str(e)[:200]})")
        torch.cuda.empty_cache()
    print("  ratios (graph):")
    for batch in batches:
        line = (f"    batch {batch:3d}: bf16 graph/eager {results['bf16-graph', batch] / results['bf16-eager', batch]:.2f}x"
                f"  int4/bf16 {results['int4-graph', batch] / results['bf16-graph', batch]:.2f}x")
        if ("hf", batch) in results:
            line += f"  bf16/HF {results['bf16-graph', batch] / results['hf', batch]:.2f}x"
        print(line)


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


def bench_gpu_engine(model_path: str, tokens: int, batches: list[int]) -> None:
    """End to end through TorchShardEngine.generate on CUDA: one thread per stream, text out."""
    from engine.model_file import load_model_file
    from engine.torch_engine import TorchShardEngine
    from engine.types import GenerationRequest, SamplingParams

    model = load_model_file(model_path)
    engine = TorchShardEngine(model, device="cuda", max_sessions=max(batches), max_context=1024)
    print(f"{model.alias} through TorchShardEngine.generate on {torch.cuda.get_device_name()}, "
          f"{tokens} greedy tokens per stream")

    def stream(i: int, out: list[float]) -> None:
        req = GenerationRequest(f"b{i}", SamplingParams(temperature=0, max_tokens=tokens), prompt=PROMPT)
        n = sum(1 for _ in engine.generate(req, threading.Event()))
        out.append(n)

    for batch in [1, *batches]:  # the first round warms up (captures the graphs)
        counts: list[float] = []
        threads = [threading.Thread(target=stream, args=(i, counts)) for i in range(batch)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        dt = time.perf_counter() - t0
        print(f"  {batch:3d} streams: {sum(counts) / dt:8.1f} tok/s in all, {sum(counts) / dt / batch:6.1f} per stream")
    engine.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--model", default="smollm2-135m-instruct")
    m.add_argument("--kv-sessions", type=int, default=4)
    c = sub.add_parser("cpu")
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--tokens", type=int, default=64)
    c.add_argument("--no-synthetic", action="store_true", help="SmolLM2 only")
    p = sub.add_parser("parity")
    p.add_argument("models", nargs="+", help="aliases or GGUF paths")
    p.add_argument("--threads", type=int, default=2)
    g = sub.add_parser("gpu")
    g.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    g.add_argument("--tokens", type=int, default=32)
    g.add_argument("--context", type=int, default=512)
    g.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    g.add_argument("--hf-batches", type=int, nargs="*", default=[1, 64])
    e = sub.add_parser("gpu-engine")
    e.add_argument("--model", default="smollm2-135m-instruct")
    e.add_argument("--tokens", type=int, default=128)
    e.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    args = ap.parse_args()
    os.environ.setdefault("MESHLLM_QUIET", "1")
    if args.what == "memory":
        bench_memory(args.model, args.kv_sessions)
    elif args.what == "parity":
        bench_parity(args.models, args.threads)
    elif args.what == "cpu":
        bench_cpu(args.threads, args.tokens, not args.no_synthetic)
    elif args.what == "gpu":
        bench_gpu(args.preset, args.tokens, args.batches, args.context, args.hf_batches)
    else:
        bench_gpu_engine(args.model, args.tokens, args.batches)


if __name__ == "__main__":
    main()
