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
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_gpu_decode import PRESETS, bench_gpu  # noqa: E402

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


# -- GPU (the decode benchmark lives in scripts/bench_gpu_decode.py) --------------------------------


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
    g.add_argument("--forms", nargs="+", default=["full", "quantized", "quantized-triton"],
                   choices=["full", "quantized", "quantized-triton"], help="bf16, tinygemm int4, Triton int4")
    g.add_argument("--no-eager", action="store_true", help="graphs only (the eager step is the slow part)")
    g.add_argument("--pdl", nargs="+", choices=["on", "off"], default=["on"],
                   help="programmatic dependent launch (engine/pdl.py); 'off on' measures both")
    g.add_argument("--same-process", action="store_true",
                   help="every form in this process (default: each form in a process of its own)")
    g.add_argument("--results", default=None, help=argparse.SUPPRESS)  # a child process's tok/s, as JSON
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
        bench_gpu(args.preset, args.tokens, args.batches, args.context, args.hf_batches, tuple(args.forms),
                  not args.no_eager, tuple(args.pdl), not args.same_process, args.results)
    else:
        bench_gpu_engine(args.model, args.tokens, args.batches)


if __name__ == "__main__":
    main()
