"""W4A16 matmuls on CUDA: the Triton kernels (engine/int4_triton.py) against tinygemm and bf16 cuBLAS.

    python scripts/bench_int4_gemm.py                       # H200: sweep launch shapes, Llama-3-8B layer shapes
    python scripts/bench_int4_gemm.py --rows 1 8 --budget-s 120
    python scripts/bench_int4_gemm.py --gluon                # the Gluon kernel (Hopper) against the rest

Every side runs on the same shapes in the same run, inside CUDA graphs (as the engine's decode step
runs) over enough copies of the weights that L2 holds none of them (as when 32 layers stream past).
For each shape and row count it prints the best Triton launch shape, its time, and the ratios to bf16
and tinygemm, plus the bytes-read share of the copy bandwidth measured in the same run. `--out FILE`
writes the per-(shape, rows) best launch shapes as JSON (the table in engine/int4_triton.py comes
from it).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.int4_triton import W4Config  # noqa: E402
from scripts.bench_gpu_decode import _copy_bandwidth  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
L2_SPAN = 256 * 2**20  # bytes of weights a timed graph cycles through: several times any L2


def graph_time(calls: list[Callable[[], object]], reps: int = 10) -> float:
    """Seconds per call of `calls` (each on its own weight copy), replayed in one CUDA graph."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    for _ in range(2):
        g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps / len(calls)


def candidates(m: int, n: int, k: int, grid_only: bool = False, gluon: bool = False) -> list[W4Config]:
    """Launch shapes around the Triton rule's choice, one axis at a time (tile width, K splits, pipeline
    depth, warps, rows per tile, weights as A or B operand), each with the PTX dequantizing path
    (magic 3) and the bf16 one (magic 2); the one-row kernel on a grid of its own; from 32 rows a tile
    grid (only that with `grid_only`). `gluon`: the Triton rule's choice and the Gluon kernels' grid (the
    plain and, from 33 rows, the warp-specialized one)."""
    from engine.int4_triton import launch_for

    base = launch_for(m, n, k)
    if gluon:  # the Gluon kernel: tile rows (half to twice M), tile width (4 or 8 warps), K splits
        out = {base}
        # one warp group per 64 weight rows; 256-wide tiles (four warp groups) read x half as often as
        # 128-wide ones, and only on row tiles up to 64 (128 rows spill registers)
        for bm, bn, sk in itertools.product(sorted({max(16, min(128, v)) for v in (m // 2, m, 2 * m)}), (64, 128, 256),
                                            (1, 2, 4, 8, 16)):
            if n // bn * -(-m // bm) * sk <= 4096 and k // 128 >= 2 * sk and (bn < 256 or 32 <= bm <= 64):
                for st in (3, 4, 6) if bm <= 32 else (3, 4):  # chunks streamed ahead in shared memory
                    out.add(W4Config(bm, bn, sk, bn // 16, st, magic=3, swap=True, gluon=True))
                    if bm >= 64:  # two wgmma in flight: the tensor cores are busier than the copies there
                        out.add(W4Config(bm, bn, sk, bn // 16, st, magic=3, swap=True, gluon=True, inflight=2))
        if m > 32:  # the warp-specialized kernel: two consumer warp groups, 128- or 256-wide tiles
            for bn, sk, st in itertools.product((128, 256), (1, 2, 4, 8), (3, 4)):
                if n % bn == 0 and k // 128 >= 2 * sk:
                    out.add(W4Config(64 if m <= 64 else 128, bn, sk, 8, st, magic=3, swap=True, gluon=True, inflight=2,
                                     ws=True))
        return sorted(out, key=str)
    if m == 1:
        return [W4Config(0, bn, sk, warps, st, magic=mg)
                for bn, sk, warps, st, mg in itertools.product((16, 32, 64), (1, 2, 4, 8, 16), (1, 2, 4), (2, 3), (4,))
                ] + [W4Config(0, 64, sk, 4, 3, magic=3) for sk in (4, 8)]
    shapes = {base, dataclasses.replace(base, swap=not base.swap)}
    shapes |= {dataclasses.replace(base, block_n=bn) for bn in (64, 128)}
    shapes |= {dataclasses.replace(base, split_k=sk) for sk in (max(1, base.split_k // 2), base.split_k * 2)}
    shapes |= {dataclasses.replace(base, stages=st) for st in (2, 3, 4)}
    shapes |= {dataclasses.replace(base, warps=8 if base.warps == 4 else 4)}
    shapes |= {dataclasses.replace(base, block_m=bm) for bm in (16, 32, 64, 128) if bm != base.block_m and bm // 2 <= m}
    out = {base} if grid_only else {dataclasses.replace(c, magic=mg) for c in shapes for mg in (2, 3)}
    if m >= 32:  # a grid over the tile (rows padded up to twice M: 128-row tiles beat 64 at 64 rows)
        for bm, bn, swap in itertools.product({m, min(2 * m, 128)}, (64, 128), (False, True)):
            tiles = n // bn * -(-m // bm)
            for sk in {max(1, 132 // tiles), max(1, 264 // tiles)}:
                out.add(W4Config(bm, bn, sk, 8 if bn == 128 else 4, 3, magic=3, swap=swap))
    return sorted(out, key=str)


def dense_row_sweep(bw: float, budget_s: float) -> None:
    """bf16 [1, K] @ W.T: a Triton split-K GEMV against cuBLAS (batch-1 decode is ~78 % GEMV time)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _row(X, W, Y, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        span = K // SPLIT_K
        rk = tl.program_id(1) * span + tl.arange(0, BLOCK_K)
        wp = W + rn[:, None] * K + rk[None, :]
        xp = X + rk
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for _ in range(0, span // BLOCK_K):
            acc += tl.sum(tl.load(wp).to(tl.float32) * tl.load(xp).to(tl.float32)[None, :], 1)
            wp += BLOCK_K
            xp += BLOCK_K
        if SPLIT_K == 1:
            tl.store(Y + rn, acc.to(Y.dtype.element_ty))
        else:
            tl.atomic_add(Y + rn, acc)

    def run(x: torch.Tensor, w: torch.Tensor, bn: int, bk: int, sk: int, warps: int, st: int) -> torch.Tensor:
        n, k = w.shape
        y = torch.zeros(n, device="cuda", dtype=torch.float32) if sk > 1 else x.new_empty(n)
        _row[(n // bn, sk)](x, w, y, n, k, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=warps, num_stages=st)
        return y.to(x.dtype) if sk > 1 else y

    t0 = time.perf_counter()
    gen = torch.Generator(device="cuda").manual_seed(1)
    for name, (n, k) in {**SHAPES, "head": (128256, 4096)}.items():
        copies = max(1, math.ceil(L2_SPAN / (n * k * 2)))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        t_cublas = graph_time([lambda w=w, x=x: torch.nn.functional.linear(x, w) for w in ws])
        rows = []
        for bn, bk, sk, warps, st in itertools.product((4, 8, 16, 32), (128, 256, 512), (1, 2, 4), (4, 8), (3,)):
            if n % bn or k % (bk * sk) or time.perf_counter() - t0 > budget_s:
                continue
            try:
                t = graph_time([lambda w=w, c=(bn, bk, sk, warps, st), x=x: run(x[0], w, *c) for w in ws], reps=5)
            except Exception as e:  # noqa: BLE001
                print(f"    dense {bn},{bk},{sk},{warps},{st}: {type(e).__name__} {str(e)[:100]}")
                continue
            rows.append((t, (bn, bk, sk, warps, st)))
        if not rows:
            continue
        rows.sort()
        t_best, c = rows[0]
        y = run(x[0], ws[0], *c).float()
        ref = torch.nn.functional.linear(x, ws[0]).float()[0]
        err = float((y - ref).norm() / ref.norm())
        print(f"  dense M=1 {name:7s} N={n:6d} K={k:5d}: cuBLAS {t_cublas * 1e6:7.1f} us ({n * k * 2 / t_cublas / bw:4.0%})"
              f"  triton {t_best * 1e6:7.1f} us ({n * k * 2 / t_best / bw:4.0%})  triton/cuBLAS {t_cublas / t_best:4.2f}x"
              f"  err {err:.1e}  [BLOCK_N, BLOCK_K, SPLIT_K, warps, stages = {c}]")
        sys.stdout.flush()
        del ws
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop sweeping after this long")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--grid-only", action="store_true", help="from 32 rows: only launch_for's shape and the tile grid")
    ap.add_argument("--gluon", action="store_true", help="only launch_for's shape and the Gluon kernel's grid")
    ap.add_argument("--dense", action="store_true", help="also sweep a bf16 Triton GEMV against cuBLAS at M=1")
    args = ap.parse_args()

    from engine.int4_triton import fits, gluon_ok, launch_for, pack_int4, w4_matmul
    from engine.linear import pack_tinygemm

    t_start = time.perf_counter()
    bw = _copy_bandwidth(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s")
    gen = torch.Generator(device="cuda").manual_seed(0)
    best: dict[str, dict[str, object]] = {}
    for name in args.shapes:
        n, k = SHAPES[name]
        bf16_bytes = n * k * 2
        w4_bytes = n * k // 2 + 2 * (k // 32) * n * 2  # codes, scales and mins
        copies_bf16 = max(1, math.ceil(L2_SPAN / bf16_bytes))
        copies_w4 = max(1, math.ceil(L2_SPAN / w4_bytes))
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02 for _ in range(copies_bf16)]
        q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int32, generator=gen)
        tiny = [pack_tinygemm(q) for _ in range(copies_w4)]
        scales = torch.full((n, k // 32), 0.003, device="cuda", dtype=torch.bfloat16)
        zeros = torch.zeros((n, k // 32), device="cuda", dtype=torch.bfloat16)  # tinygemm's sz below: the same
        qw = [pack_int4(q, scales, zeros) for _ in range(copies_w4)]
        sz = torch.full((k // 32, n, 2), 0.003, device="cuda", dtype=torch.bfloat16)
        sz[..., 1] = 0.0  # tinygemm: (q - 8) * scale + zero, the same weights
        # the two int4 forms hold the same weights: check the Triton kernels against tinygemm once
        xc = torch.randn(5, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        ref = torch._weight_int4pack_mm(xc, tiny[0], 32, sz).float()
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            t_bf16 = graph_time([lambda w=w, x=x: torch.nn.functional.linear(x, w) for w in dense])
            t_tiny = graph_time([lambda t=t, x=x, sz=sz: torch._weight_int4pack_mm(x, t, 32, sz) for t in tiny])
            rows: list[tuple[float, W4Config]] = []
            for cfg in candidates(m, n, k, args.grid_only, args.gluon):
                if not fits(cfg, n) or time.perf_counter() - t_start > args.budget_s:
                    continue
                try:
                    t = graph_time([lambda w=w, c=cfg, x=x: w4_matmul(x, w, c) for w in qw], reps=5)
                except Exception as e:  # noqa: BLE001 - a launch shape the compiler refuses is skipped
                    print(f"    {cfg}: {type(e).__name__} {str(e)[:120]}")
                    continue
                rows.append((t, cfg))
            if not rows:
                print(f"  {name} M={m}: no Triton launch shape measured (budget)")
                continue
            rows.sort(key=lambda r: r[0])
            t_best, cfg_best = rows[0]
            old_cfg = launch_for(m, n, k, gluon_ok(x, qw[0]))  # the rule before this sweep (what the engine runs now)
            t_old = graph_time([lambda w=w, c=old_cfg, x=x: w4_matmul(x, w, c) for w in qw], reps=5)
            conv = dataclasses.replace(cfg_best, magic=0)
            t_nomagic = graph_time([lambda w=w, c=conv, x=x: w4_matmul(x, w, c) for w in qw], reps=5)
            second = dataclasses.replace(cfg_best, fixup=False)  # K splits summed by a second kernel
            t_second = graph_time([lambda w=w, c=second, x=x: w4_matmul(x, w, c) for w in qw], reps=5)
            y = w4_matmul(xc[:m], qw[0], cfg_best).float()
            err = float((y - ref[:m]).norm() / ref[:m].norm()) if m <= 5 else float("nan")  # vs tinygemm
            print(f"  {name:7s} N={n:5d} K={k:5d} M={m:3d}: bf16 {t_bf16 * 1e6:7.1f} us ({bf16_bytes / t_bf16 / bw:4.0%})"
                  f"  tinygemm {t_tiny * 1e6:7.1f} us  triton {t_best * 1e6:7.1f} us ({w4_bytes / t_best / bw:4.0%})"
                  f"  triton/bf16 {t_bf16 / t_best:4.2f}x  triton/tinygemm {t_tiny / t_best:4.2f}x"
                  f"  int->float by conversion {t_nomagic * 1e6:6.1f} us; launch_for {t_old * 1e6:6.1f} us;"
                  f" splits summed by a second kernel {t_second * 1e6:6.1f} us"
                  f"  err {err:.1e}  [{cfg_best}]")
            print("      next best: " + "; ".join(f"{t * 1e6:.1f} us {c}" for t, c in rows[1:4]))
            by_path = {f"magic {mg}": min((t for t, c in rows if c.magic == mg), default=0.0) for mg in (1, 2, 3, 4)}
            if args.gluon:
                by_width = {bn: min((t for t, c in rows if c.block_n == bn), default=0.0) for bn in (64, 128, 256)}
                print("      best per tile width: " + ", ".join(f"{bn} {t * 1e6:.1f} us" for bn, t in by_width.items() if t))
            print("      best per dequantizing path: " + ", ".join(f"{p} {t * 1e6:.1f} us" for p, t in by_path.items() if t))
            best[f"{name}:{m}"] = {"cfg": dataclasses.asdict(cfg_best),
                                   "us": t_best * 1e6, "old_us": t_old * 1e6, "bf16_us": t_bf16 * 1e6, "tiny_us": t_tiny * 1e6}
            sys.stdout.flush()
        del dense, tiny, qw
        torch.cuda.empty_cache()
    if args.dense:
        dense_row_sweep(bw, 150.0)
    if args.out:
        args.out.write_text(json.dumps(best, indent=1, default=str))
    print(f"swept in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
