"""One-row bf16 matmuls (batch-1 decode) in Triton, with the FFN's activation fused in.

At batch 1 a Llama-3-8B decode step is ~80 % matrix-vector products. On an H200 cuBLAS reads the
qkv, o and head matrices at 62-96 % of the copy bandwidth; this kernel read them 3-9 % faster
(scripts/bench_int4_gemm.py --dense), and computing act(gate) * up inside the gate/up product saves the
separate activation kernel of every layer (each kernel of a graphed step costs ~3-4 us). Products
accumulate per lane over the whole K walk and are reduced across lanes once at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.pdl import launch_options, pdl_prologue

BLOCK_K = 512
MAX_K = 8192  # past this (Llama's down projection, K = 14,336) cuBLAS measured faster


@triton.jit
def _gemv_kernel(X, W, Y, N, K, ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """y[n] = W[n] . x; with ACT (1 silu, 2 gelu-tanh) W is [2 N, K] (gate rows, then up rows) and
    y[n] = act(W[n] . x) * (W[N + n] . x). The first weight tile is loaded before the PDL wait
    (weights are never written by the kernel before, x is): its DRAM latency hides under that
    kernel's tail."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rows_ok = rn < N
    ok = rows_ok[:, None] & (rk < K)[None, :]
    w_first = tl.load(W + rn[:, None] * K + rk[None, :], mask=ok, other=0.0)
    u_first = w_first
    if ACT != 0:
        u_first = tl.load(W + (rn + N)[:, None] * K + rk[None, :], mask=ok, other=0.0)
    pdl_prologue(PDL)
    x = tl.load(X + rk, mask=rk < K, other=0.0).to(tl.float32)[None, :]
    acc = w_first.to(tl.float32) * x
    acc_up = u_first.to(tl.float32) * x
    for k0 in range(BLOCK_K, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(X + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        ok = rows_ok[:, None] & k_ok[None, :]
        acc += tl.load(W + rn[:, None] * K + kk[None, :], mask=ok, other=0.0).to(tl.float32) * x
        if ACT != 0:
            acc_up += tl.load(W + (rn + N)[:, None] * K + kk[None, :], mask=ok, other=0.0).to(tl.float32) * x
    y = tl.sum(acc, 1)
    if ACT == 1:
        y = y / (1.0 + tl.exp(-y)) * tl.sum(acc_up, 1)
    elif ACT == 2:
        inner = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (2.0 / (1.0 + tl.exp(-2.0 * inner))) * tl.sum(acc_up, 1)
    tl.store(Y + rn, y.to(Y.dtype.element_ty), mask=rows_ok)


_ACTS = {None: 0, "silu": 1, "gelu_tanh": 2}


def gemv(x: torch.Tensor, weight: torch.Tensor, act: str | None = None) -> torch.Tensor:
    """x [K] @ weight.T -> [N]; with `act`, weight is [2 F, K] and the result act(gate) * up [F]."""
    rows, k = weight.shape
    n = rows // 2 if act else rows
    y = torch.empty(n, device=x.device, dtype=x.dtype)
    block_n = 4 if n <= 4096 else 8 if n <= 16384 or act else 16
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, y, n, k, ACT=_ACTS[act], BLOCK_N=block_n, BLOCK_K=BLOCK_K, num_warps=4, num_stages=3,
        **launch_options(x.device),
    )
    return y
