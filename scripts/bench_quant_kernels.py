"""Matmul kernels for GGUF weights, all sides in one run: time per call, weight GB/s, ratio to 16-bit.

    .venv/bin/python scripts/bench_quant_kernels.py                      # CPU, 1 thread
    .venv/bin/python scripts/bench_quant_kernels.py --threads 2 --rows 1 4 16
    .venv/bin/python scripts/bench_quant_kernels.py --errors --n 96 --k 512   # each form's error
    python scripts/bench_quant_kernels.py --device cuda --rows 1 8 32   # GPU: int4 vs bf16 vs dequant

CPU sides: fp32 and bf16 dense (torch), ggml on GGUF bytes (Q4_0, Q4_1, Q4_K, Q6_K, Q8_0), torch's
`_weight_int4pack_mm_for_cpu` and `_weight_int8pack_mm`. CUDA sides: bf16 cuBLAS, tinygemm int4 from
Q4_K (`Int4Linear`). Shapes default to one 8192x2048 matrix (DESIGN.md).
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import numpy as np
import torch


def timed(fn: Callable[[], object], device: torch.device, min_s: float = 0.3) -> float:
    """Seconds per call (median of 5 batches after warm-up)."""
    for _ in range(3):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.05:
        fn()
        reps += 1
    sync()
    reps = max(1, int(reps * min_s / 0.05 / 5))
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) / reps)
    return float(np.median(samples))


def cpu_sides(n: int, k: int, m: int) -> list[tuple[str, Callable[[], object], int]]:
    from engine import ggml_cpu
    from engine.ggml_cpu import GgmlCpu
    from engine.linear import GgmlLinear
    from shard.gguf_tensor import RawTensor

    w = torch.randn(n, k) * 0.02
    x = torch.randn(m, k)
    sides: list[tuple[str, Callable[[], object], int]] = [
        ("fp32 dense", lambda: x @ w.T, n * k * 4),
    ]
    wb, xb = w.bfloat16(), x.bfloat16()
    sides.append(("bf16 dense", lambda: xb @ wb.T, n * k * 2))
    ggml = GgmlCpu(torch.get_num_threads())
    for t in ("Q4_0", "Q4_1", "Q4_K", "Q6_K", "Q8_0"):
        data = ggml_cpu.quantize(t, w.numpy())
        lin = GgmlLinear(ggml, [RawTensor("w", t, n, k, data)], None)
        sides.append((f"ggml {t}", lambda lin=lin: lin(x), data.nbytes))
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    sz = torch.rand(k // 32, n, 2, dtype=torch.bfloat16)
    sides.append(("torch int4pack_for_cpu", lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, 32, sz),
                  n * k // 2))
    w8, s8 = torch.randint(-127, 127, (n, k), dtype=torch.int8), torch.rand(n, dtype=torch.bfloat16)
    sides.append(("torch int8pack", lambda: torch.ops.aten._weight_int8pack_mm(xb, w8, s8), n * k))
    return sides


def cuda_sides(n: int, k: int, m: int) -> list[tuple[str, Callable[[], object], int]]:
    from engine import linear as lin_mod
    from shard.gguf_tensor import Int4Groups

    dev = torch.device("cuda")
    w = torch.randn(n, k) * 0.02
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    wb = w.to(dev, torch.bfloat16)
    # Q4_K-like groups built in numpy (ggml's quantizer may be absent on the GPU machine)
    q = np.random.default_rng(0).integers(0, 16, (n, k), dtype=np.uint8)
    groups = Int4Groups(q, np.full((n, k // 32), 0.01, np.float32), np.zeros((n, k // 32), np.float32))
    int4 = lin_mod.Int4Linear.from_groups([groups], [n], None, dev)
    return [
        ("bf16 cuBLAS", lambda: x @ wb.T, n * k * 2),
        ("tinygemm int4 (g32)", lambda: int4(x), int4.nbytes),
    ]


def print_errors(n: int, k: int) -> None:
    """Relative error of each CPU form against fp32 dequantized weights, and of the CUDA int4 form's
    bf16 scale/zero rounding (computed on the CPU; exact in fp32 before that rounding)."""
    from engine import ggml_cpu
    from engine.ggml_cpu import GgmlCpu
    from engine.linear import GgmlLinear
    from shard.gguf_tensor import INT4_TYPES, RawTensor, int4_dequantize, to_int4_groups

    ggml = GgmlCpu(torch.get_num_threads())
    w = (np.random.default_rng(0).standard_normal((n, k)) * 0.05).astype(np.float32)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1))
    for t in sorted(ggml_cpu.GGML_TYPES):
        raw = RawTensor("w", t, n, k, ggml_cpu.quantize(t, w))
        ref = x @ torch.from_numpy(raw.dequantize()).T
        (y,) = GgmlLinear(ggml, [raw], None)(x)
        line = f"  {t:5s} ggml x @ W.T: {float((y - ref).norm() / ref.norm()):.1e} relative"
        if t in INT4_TYPES:
            g = to_int4_groups(raw)
            as_bf16 = type(g)(g.q, *(torch.from_numpy(a).bfloat16().float().numpy() for a in (g.scales, g.zeros)))
            exact = raw.dequantize()
            line += (f"; int4 groups exact to {np.abs(int4_dequantize(g) - exact).max():.0e}, bf16 scale/zero "
                     f"{np.linalg.norm(int4_dequantize(as_bf16) - exact) / np.linalg.norm(exact):.1e}")
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=8192, help="output features")
    ap.add_argument("--k", type=int, default=2048, help="input features")
    ap.add_argument("--rows", type=int, nargs="+", default=[1], help="input rows (batch) to time")
    ap.add_argument("--errors", action="store_true", help="print each form's error instead of timing (CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.errors:
        print_errors(args.n, args.k)
        return
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    print(f"{name}, torch {torch.__version__}, {args.threads} thread(s), W [{args.n}, {args.k}]")
    for m in args.rows:
        sides = cuda_sides(args.n, args.k, m) if dev.type == "cuda" else cpu_sides(args.n, args.k, m)
        base = None
        for label, fn, nbytes in sides:
            s = timed(fn, dev)
            if label.startswith("bf16"):
                base = s
            ratio = f"{base / s:5.2f}x bf16" if base else ""
            print(f"  M={m:3d} {label:24s} {s * 1e3:8.3f} ms  {nbytes / s / 1e9:7.1f} GB/s  {ratio}")


if __name__ == "__main__":
    main()
