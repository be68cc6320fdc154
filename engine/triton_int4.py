"""A Triton GEMM over group-32 int4 weights (CUDA), for the batch sizes where tinygemm loses to bf16.

tinygemm (`torch._weight_int4pack_mm`) reads int4 fastest at 1-4 input rows but falls to 0.35x of bf16
cuBLAS at 32 rows (DESIGN.md). This kernel dequantizes in registers and feeds tensor cores with
`tl.dot`, so wide decode batches still read 4-bit weights. Split-K keeps enough programs in flight
for narrow batches.

Layout (engine.linear.Int4Linear keeps it): w uint8 [N, K / 2], value k in the low nibble of byte
k // 2 when k is even, the high nibble when odd; scales and zeros bf16 [K / 32, N];
w[n, k] = (q - 8) * scale + zero, tinygemm's convention.
CPU builds of torch ship no Triton: the module then imports, with `AVAILABLE` False. CI never runs
the kernel; docs/torch-engine.md says where it was measured.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

AVAILABLE = triton is not None


def int4_gemm(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """x bf16 [M, K] @ dequant(w).T -> bf16 [M, N]."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    m, k = x.shape
    n = w.shape[0]
    out = torch.zeros((m, n), device=x.device, dtype=torch.float32)
    bucket = 1 << max(0, (m - 1).bit_length())  # autotune per power-of-two batch, not per M

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]), meta["SPLIT_K"])

    _int4_gemm[grid](x.contiguous(), w, scales, zeros, out, m, n, k, bucket)
    return out.to(torch.bfloat16)


if triton is not None:
    _CONFIGS = [
        triton.Config({"BM": bm, "BN": bn, "BK": bk, "SPLIT_K": sk}, num_warps=w, num_stages=s)
        for bm, bn, bk, sk, w, s in [
            (16, 64, 128, 4, 4, 3),
            (16, 64, 128, 2, 4, 3),
            (16, 128, 128, 2, 4, 3),
            (16, 128, 64, 1, 4, 4),
            (32, 64, 128, 2, 4, 3),
            (32, 128, 128, 1, 4, 3),
            (64, 128, 64, 1, 4, 3),
            (64, 64, 128, 2, 4, 3),
        ]
    ]


    @triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N", "K"], reset_to_zero=["out_ptr"])
    @triton.jit
    def _int4_gemm(
        x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, M_BUCKET,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        n_tiles = tl.cdiv(N, BN)
        pid_m, pid_n = pid // n_tiles, pid % n_tiles
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        k_per_split = tl.cdiv(K, BK * SPLIT_K) * BK
        k_begin = pid_k * k_per_split
        for k0 in range(k_begin, tl.minimum(k_begin + k_per_split, K), BK):
            offs_k = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=offs_m[:, None] < M, other=0.0)
            nmask = offs_n[:, None] < N
            byte = tl.load(w_ptr + offs_n[:, None] * (K // 2) + (offs_k[None, :] // 2), mask=nmask, other=0)
            q = ((byte >> ((offs_k[None, :] % 2) * 4)) & 0xF).to(tl.float32)  # [BN, BK]
            g = offs_k[None, :] // 32
            s = tl.load(s_ptr + g * N + offs_n[:, None], mask=nmask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * N + offs_n[:, None], mask=nmask, other=0.0).to(tl.float32)
            w = ((q - 8.0) * s + z).to(tl.bfloat16)
            acc += tl.dot(x, tl.trans(w))
        out = out_ptr + offs_m[:, None] * N + offs_n[None, :]
        omask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if SPLIT_K == 1:
            tl.store(out, acc, mask=omask)
        else:
            tl.atomic_add(out, acc, mask=omask)
