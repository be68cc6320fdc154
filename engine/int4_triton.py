"""A W4A16 matmul in Triton: group-32 int4 weights, 16-bit activations, for every batch size.

tinygemm (`torch._weight_int4pack_mm`) multiplies one row at a time: 1.6x bf16 at one row, 0.2x at 32
(H200). These kernels dequantize a tile of weights in registers and either reduce it against one row
(`_w4_row_kernel`, a GEMV) or feed it to the tensor cores (`_w4_dot_kernel`, `tl.dot`), so wide decode
batches read the 4-bit weights once per step and stay in the 4-bit footprint.

Layout (`pack_int4`): `qw` int32 [K / 8, N], so a warp loads along N (coalesced), one load per eight
weights; within each chunk of 128 k the nibbles are ordered so that unpacking needs only shifts (see
`pack_int4`). `scales` and `zeros` [K / 32, N] in the activation dtype, w[n, k] = (q - 8) * scale + zero (as
tinygemm's and `Int4Groups`'). A first version loaded each word once per nibble
(and each scale once per weight): 0.3-0.5x of bf16 on an H200, bound by load instructions, not bytes.

The int -> float conversion is the ALU cost that decides whether dequantizing keeps up with HBM: the
`MAGIC` path ORs the nibble into the mantissa of 2^23 and subtracts 2^23, two cheap ops instead of
one conversion (the trick Marlin and FasterTransformer play on half precision).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

GROUP = 32


@dataclass(frozen=True, slots=True)
class W4Config:
    """One launch shape; `block_m` 0 selects the one-row kernel (M == 1), `swap` the kernel with the
    weights as the A operand. K is walked in chunks of 128."""

    block_m: int
    block_n: int
    split_k: int
    warps: int
    stages: int
    magic: int = 1  # int -> float: 0 by conversion, 1 the fp32 mantissa trick, 2 bf16 math (tensor-core kernels)
    swap: bool = False


@dataclass(frozen=True, slots=True)
class W4Weight:
    """`pack_int4`'s output: int4 codes and per-group scale and zero, K padded to a multiple of 128."""

    qw: torch.Tensor  # int32 [N, Kp / 8]
    scales: torch.Tensor  # [Kp / 32, N], activation dtype
    zeros: torch.Tensor  # [Kp / 32, N]
    in_features: int  # K before padding

    @property
    def out_features(self) -> int:
        return self.qw.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qw, self.scales, self.zeros))


def pack_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> W4Weight:
    """q uint8 0..15 [N, K], scales and zeros [N, K / 32] (w = (q - 8) * scale + zero, tinygemm's and
    `Int4Groups`' form: centring q halves the error of 16-bit scales against q * scale + min) -> the
    kernels' layout.

    Chunk c of row n holds k in [128 c, 128 c + 128) as 16 words; nibble j of word r is k = 128 c + 16 j + r.
    So nibble j of a [BLOCK_N, 16] tile is the [BLOCK_N, 16] slice of W that starts at k = 128 c + 16 j:
    eight shifts give eight `tl.dot` operands, with no reshape in registers and one load per 8 weights.
    K is padded with zero scales and zeros (they add nothing)."""
    n, k = q.shape
    if k % GROUP:
        raise ValueError(f"K={k} is not a multiple of {GROUP}")
    kp = -(-k // 128) * 128
    codes = torch.zeros(n, kp, dtype=torch.int32, device=q.device)
    codes[:, :k] = q.to(torch.int32)
    v = codes.reshape(n, kp // 128, 8, 16)  # [N, chunk, j, r]
    shifts = (torch.arange(8, device=q.device, dtype=torch.int32) * 4).view(1, 1, 8, 1)
    qw = (v << shifts).sum(2, dtype=torch.int32).reshape(n, kp // 8)  # disjoint bits: the sum is an OR

    def groups(t: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(kp // GROUP, n, dtype=t.dtype, device=t.device)
        out[: k // GROUP] = t.T
        return out.contiguous()

    return W4Weight(qw.contiguous(), groups(scales), groups(zeros), k)


@triton.jit
def _tile(q, j: tl.constexpr, s, z, MAGIC: tl.constexpr):
    """The weights of nibble j of a code tile, for `tl.dot`, in the scales' 16-bit dtype."""
    if MAGIC == 2:  # 128 + nib as a bf16 bit pattern; the rest in bf16 (two weights an instruction)
        f = (((q >> (4 * j)) & 0xF) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
        return (f - 136.0).to(s.dtype) * s + z
    return (_nibbles(q, j, MAGIC) * s.to(tl.float32) + z.to(tl.float32)).to(s.dtype)


@triton.jit
def _nibbles(q, j: tl.constexpr, MAGIC: tl.constexpr):
    nib = (q >> (4 * j)) & 0xF
    if MAGIC:  # 2^23 + nib as a float32 bit pattern, minus 2^23 + 8: exact, no int -> float conversion
        return (nib | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    return nib.to(tl.float32) - 8.0


@triton.jit
def _w4_dot_kernel(
    X, QW, S, Z, Y, M, N, K, sxm, sym, sys, chunks_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, MAGIC: tl.constexpr,
):  # fmt: skip
    """acc [BLOCK_M, BLOCK_N] += x tile @ dequantized W tile.T (weights as the B operand)."""
    kw = tl.cdiv(K, 128) * 16
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r16 = tl.arange(0, 16)
    c_lo = pid_k * chunks_per_split
    c_hi = tl.minimum(c_lo + chunks_per_split, tl.cdiv(K, 128))
    rows_ok = rm[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(c_lo, c_hi):
        q = tl.load(QW + rn[None, :] * kw + (c * 16 + r16)[:, None])  # [16, BLOCK_N]: 128 k of each n
        for g in tl.static_range(4):  # the chunk's four groups of 32
            s = tl.load(S + (c * 4 + g) * N + rn)[None, :]
            z = tl.load(Z + (c * 4 + g) * N + rn)[None, :]
            for h in tl.static_range(2):
                kk = c * 128 + (2 * g + h) * 16 + r16
                a = tl.load(X + rm[:, None] * sxm + kk[None, :], mask=rows_ok & (kk[None, :] < K), other=0.0)
                acc = tl.dot(a, _tile(q, 2 * g + h, s, z, MAGIC).to(a.dtype), acc)
    tl.store(Y + pid_k * sys + rm[:, None] * sym + rn[None, :], acc.to(Y.dtype.element_ty), mask=rows_ok)


@triton.jit
def _w4_swap_kernel(
    X, QW, S, Z, Y, M, N, K, sxm, sym, sys, chunks_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, MAGIC: tl.constexpr,
):  # fmt: skip
    """acc [BLOCK_N, BLOCK_M] += dequantized W tile @ x tile.T: the weights are the A operand, which the
    tensor cores take from registers (Hopper's wgmma reads only B from shared memory), so a
    dequantized tile needs no trip through shared memory; and a few rows fill wgmma's N side."""
    kw = tl.cdiv(K, 128) * 16
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r16 = tl.arange(0, 16)
    c_lo = pid_k * chunks_per_split
    c_hi = tl.minimum(c_lo + chunks_per_split, tl.cdiv(K, 128))
    rows_ok = rm[None, :] < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for c in range(c_lo, c_hi):
        q = tl.load(QW + rn[:, None] * kw + (c * 16 + r16)[None, :])  # [BLOCK_N, 16]
        for g in tl.static_range(4):
            s = tl.load(S + (c * 4 + g) * N + rn)[:, None]
            z = tl.load(Z + (c * 4 + g) * N + rn)[:, None]
            for h in tl.static_range(2):
                kk = c * 128 + (2 * g + h) * 16 + r16
                xt = tl.load(X + rm[None, :] * sxm + kk[:, None], mask=rows_ok & (kk[:, None] < K), other=0.0)
                acc = tl.dot(_tile(q, 2 * g + h, s, z, MAGIC).to(xt.dtype), xt, acc)
    tl.store(Y + pid_k * sys + rm[None, :] * sym + rn[:, None], acc.to(Y.dtype.element_ty), mask=rows_ok)


@triton.jit
def _w4_row_kernel(
    X, QW, S, Z, Y, N, K, sys, chunks_per_split,
    BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, MAGIC: tl.constexpr,
):  # fmt: skip
    """One input row (a GEMV) on the CUDA cores: products accumulate per lane in [BLOCK_N, 16] and
    are reduced across lanes once, at the end (a reduction per tile cost more than the math)."""
    kw = tl.cdiv(K, 128) * 16
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r16 = tl.arange(0, 16)
    c_lo = pid_k * chunks_per_split
    c_hi = tl.minimum(c_lo + chunks_per_split, tl.cdiv(K, 128))
    acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    for c in range(c_lo, c_hi):
        q = tl.load(QW + rn[:, None] * kw + (c * 16 + r16)[None, :])  # [BLOCK_N, 16]
        for g in tl.static_range(4):
            s = tl.load(S + (c * 4 + g) * N + rn).to(tl.float32)[:, None]
            z = tl.load(Z + (c * 4 + g) * N + rn).to(tl.float32)[:, None]
            for h in tl.static_range(2):
                kk = c * 128 + (2 * g + h) * 16 + r16
                a = tl.load(X + kk, mask=kk < K, other=0.0).to(tl.float32)[None, :]
                acc += (_nibbles(q, 2 * g + h, MAGIC) * s + z) * a
    tl.store(Y + pid_k * sys + rn, tl.sum(acc, 1).to(Y.dtype.element_ty))


@triton.jit
def _sum_splits_kernel(P, Y, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """Y = sum of the K splits' fp32 partials, added in split order: the same bits on every run (atomic
    adds would add in whatever order the splits finish, and greedy ids drifted between runs)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(P + s * numel + offs, mask=ok, other=0.0)
    tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=ok)


def fits(cfg: W4Config, n: int) -> bool:
    """Whether a launch shape tiles N exactly (the kernels carry no N mask)."""
    return n % cfg.block_n == 0


def w4_matmul(x: torch.Tensor, w: W4Weight, cfg: W4Config) -> torch.Tensor:
    """x [M, K] (16-bit) @ W.T -> [M, N] in x's dtype."""
    m, k = x.shape
    n = w.out_features
    if k != w.in_features or not fits(cfg, n):
        raise ValueError(f"launch shape {cfg} or input [{m}, {k}] does not fit a [{n}, {w.in_features}] weight")
    x = x.contiguous()
    chunks = w.qw.shape[1] // 16
    per_split = -(-chunks // cfg.split_k)
    y = x.new_empty(m, n)
    # K splits write fp32 partials, summed in a fixed order by a second kernel
    out = y if cfg.split_k == 1 else torch.empty(cfg.split_k, m, n, device=x.device, dtype=torch.float32)
    if cfg.block_m == 0:
        if m != 1:
            raise ValueError("the one-row kernel takes M == 1")
        _w4_row_kernel[(n // cfg.block_n, cfg.split_k)](
            x, w.qw, w.scales, w.zeros, out, n, k, m * n, per_split, BLOCK_N=cfg.block_n, SPLIT_K=cfg.split_k,
            MAGIC=cfg.magic, num_warps=cfg.warps, num_stages=cfg.stages,
        )  # fmt: skip
    else:
        kernel = _w4_swap_kernel if cfg.swap else _w4_dot_kernel
        kernel[(n // cfg.block_n, triton.cdiv(m, cfg.block_m), cfg.split_k)](
            x, w.qw, w.scales, w.zeros, out, m, n, k, x.stride(0), n, m * n, per_split, BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n, SPLIT_K=cfg.split_k, MAGIC=cfg.magic, num_warps=cfg.warps, num_stages=cfg.stages,
        )  # fmt: skip
    if cfg.split_k > 1:
        _sum_splits_kernel[(triton.cdiv(m * n, 1024),)](out, y, m * n, SPLIT_K=cfg.split_k, BLOCK=1024, num_warps=4)
    return y


def launch_for(m: int, n: int) -> W4Config:
    """The launch shape for M rows of an [N, K] weight: the winners of `scripts/bench_int4_gemm.py` on an
    H200 (Llama-3-8B layer shapes, docs/benchmarks.md), as a rule of M and N. Few output tiles (N <
    16,384) want more K splits to fill 132 SMs; the one-row kernel wins at M = 1, the swapped
    tensor-core kernel above it."""
    wide = n >= 16384
    if m == 1:
        cfg = W4Config(0, 64 if n >= 6144 else 32, 8, 4, 3)
    elif m <= 16:  # bf16 dequantizing math (magic 2) won or tied from 2 to 32 rows on every shape but qkv's
        cfg = W4Config(16, 64, 4, 4, 3, magic=2) if wide else W4Config(16, 64, 8, 4, 2, magic=2, swap=True)
    elif m <= 32:
        cfg = W4Config(32, 128, 4, 8, 3, magic=2, swap=True) if wide else W4Config(32, 64, 8, 4, 2, magic=2, swap=True)
    elif m <= 64:
        cfg = W4Config(64, 64, 1 if wide else 4, 4, 2, swap=True)
    else:
        cfg = W4Config(128, 128, 1, 8, 3, swap=True) if wide else W4Config(64, 64, 2, 4, 2, swap=True)
    for block_n in (cfg.block_n, 32, 16):  # N that the tile does not divide (small models)
        if n % block_n == 0:
            return dataclasses.replace(cfg, block_n=block_n)
    raise ValueError(f"N={n} is not a multiple of 16")
