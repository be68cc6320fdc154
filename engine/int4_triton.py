"""A W4A16 matmul in Triton: group-32 int4 weights, 16-bit activations, for every batch size.

tinygemm (`torch._weight_int4pack_mm`) multiplies one row at a time: 1.6x bf16 at one row, 0.2x at 32
(H200). These kernels dequantize a tile of weights in registers and either reduce it against one row
(`_w4_row_kernel`, a GEMV) or feed it to the tensor cores (`_w4_dot_kernel`, `tl.dot`), so wide decode
batches read the 4-bit weights once per step and stay in the 4-bit footprint.

Layout (`pack_int4`): `qw` int32 [N, K / 8], one load per eight weights; within each chunk of 128 k
the nibbles are ordered so that unpacking needs only shifts, and the two halves of a group of 32 sit
16 bits apart in a word, where one PTX `lop3` makes both of them bf16 at once (see `pack_int4`).
`scales` and `zeros` [K / 32, N] in the activation dtype, w[n, k] = (q - 8) * scale + zero (as
tinygemm's and `Int4Groups`'). Launch shapes: engine/int4_launch.py; on Hopper, engine/int4_gluon.py.

The int -> float conversion is the ALU cost that decides whether dequantizing keeps up with HBM
(Nsight Compute: the kernels were ALU-bound at 34 % of DRAM bandwidth). `magic` picks the path:
0 converts; 1 ORs the nibble into the mantissa of 2^23 and subtracts 2^23 (fp32); 2 does the same in
bf16 (128 + q); 3 (bf16 on CUDA) does two weights per instruction in PTX: one `lop3` puts two
nibbles into the mantissas of a bf16x2 pair and two `fma.rn.bf16x2` subtract 136 and apply scale
and zero (Marlin's and FasterTransformer's trick). The one-row kernel's 4 does the same, then widens
each bf16 to fp32 (a shift or a mask) for fp32 products; its 3 keeps fp32 throughout but takes scale
and zero out of the inner loop: sum (q - 8) s x + z x = s sum q' x + (z - 8 s) sum x. On an H200 the
PTX paths cut the one-row kernel's time by 20-30 % and the tensor-core kernels' by 0-15 %
(docs/benchmarks.md); the kernels stay instruction- and latency-bound, at 10-46 % of the copy bandwidth.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from engine.int4_launch import W4Config, fits, launch_for, plain
from engine.pdl import launch_options, pdl_prologue

__all__ = ["GROUP", "W4Config", "W4Weight", "fits", "gluon_ok", "launch_for", "pack_int4", "shift", "w4_matmul"]

GROUP = 32


def shift(j: int) -> int:
    """The bit offset of nibble j (k = 16 j + r of a 128-k chunk) in its word: a group's two halves
    (j = 2 g, 2 g + 1) 16 bits apart."""
    return 4 * (j // 2) + 16 * (j % 2)


@dataclass(frozen=True, slots=True)
class W4Weight:
    """`pack_int4`'s output: int4 codes and per-group scale and zero, K padded to a multiple of 128."""

    qw: torch.Tensor  # int32 [N, Kp / 8]
    scales: torch.Tensor  # [Kp / 32, N], activation dtype
    zeros: torch.Tensor  # [Kp / 32, N]
    in_features: int  # K before padding
    # int32, zero between calls: split-K programs count themselves per output tile. One stream at a
    # time (the engine's steps are serialised): two concurrent calls would mix their counts.
    counters: torch.Tensor

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

    Chunk c of row n holds k in [128 c, 128 c + 128) as 16 words; word r holds k = 128 c + 16 j + r for
    j = 0..7, j = 2 g at bits 4 g and j = 2 g + 1 at bits 4 g + 16 (`shift`). So nibble j of a
    [BLOCK_N, 16] tile is the [BLOCK_N, 16] slice of W that starts at k = 128 c + 16 j: eight shifts give
    eight `tl.dot` operands, with no reshape in registers and one load per 8 weights; and the two
    halves of group g are one shift and one mask away from a bf16x2 pair.
    K is padded with zero scales and zeros (they add nothing)."""
    n, k = q.shape
    if k % GROUP:
        raise ValueError(f"K={k} is not a multiple of {GROUP}")
    kp = -(-k // 128) * 128
    codes = torch.zeros(n, kp, dtype=torch.int32, device=q.device)
    codes[:, :k] = q.to(torch.int32)
    v = codes.reshape(n, kp // 128, 8, 16)  # [N, chunk, j, r]
    shifts = torch.tensor([shift(j) for j in range(8)], device=q.device, dtype=torch.int32).view(1, 1, 8, 1)
    qw = (v << shifts).sum(2, dtype=torch.int32).reshape(n, kp // 8)  # disjoint bits: the sum is an OR

    def groups(t: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(kp // GROUP, n, dtype=t.dtype, device=t.device)
        out[: k // GROUP] = t.T
        return out.contiguous()

    counters = torch.zeros(max(1, n // 16), dtype=torch.int32, device=q.device)  # a tile is 16+ outputs
    return W4Weight(qw.contiguous(), groups(scales), groups(zeros), k, counters)


@triton.jit
def _nib(q, j: tl.constexpr):
    """Nibble j of each code word (at bit `shift(j)`), 0..15."""
    return (q >> (4 * (j // 2) + 16 * (j % 2))) & 0xF


@triton.jit
def _nibbles(q, j: tl.constexpr, MAGIC: tl.constexpr):
    """Nibble j of each code word minus 8, in fp32."""
    nib = _nib(q, j)
    if MAGIC:  # 2^23 + nib as a float32 bit pattern, minus 2^23 + 8: exact, no int -> float conversion
        return (nib | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    return nib.to(tl.float32) - 8.0


@triton.jit
def _tile(q, j: tl.constexpr, s, z, MAGIC: tl.constexpr):
    """The weights of nibble j of a code tile, for `tl.dot`, in the scales' 16-bit dtype."""
    if MAGIC == 2:  # 128 + nib as a bf16 bit pattern; the rest in bf16
        f = (_nib(q, j) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
        return (f - 136.0).to(s.dtype) * s + z
    return (_nibbles(q, j, MAGIC) * s.to(tl.float32) + z.to(tl.float32)).to(s.dtype)


# two nibbles 16 bits apart ($2, shifted to bits 0-3 and 16-19) -> two bf16 weights ($0, $1) with
# scale $3 and zero $4: lop3 into 128.0's mantissa, subtract 136, apply scale and zero (the Gluon kernel's too)
PAIR_PTX = tl.constexpr("""{
    .reg .b32 t, sc, zc, one, off;
    lop3.b32 t, $2, 0x000F000F, 0x43004300, 0xEA;
    mov.b32 one, 0x3F803F80;
    mov.b32 off, 0xC308C308;
    fma.rn.bf16x2 t, t, one, off;
    mov.b32 sc, {$3, $3};
    mov.b32 zc, {$4, $4};
    fma.rn.bf16x2 t, t, sc, zc;
    mov.b32 {$0, $1}, t;
    }""")


@triton.jit
def _pair(q, g: tl.constexpr, s, z, MAGIC: tl.constexpr):
    """The two halves of group g of a code tile (nibbles 2 g and 2 g + 1), dequantized for `tl.dot`.
    MAGIC 3 (bf16 only): per word one lop3 makes both 128 + q bf16 (bits 0-3 and 16-19 under 0x4300),
    one fma.bf16x2 subtracts 136 (exact), one applies scale and zero: 1.5 instructions a weight."""
    if MAGIC == 3:
        lo, hi = tl.inline_asm_elementwise(
            asm=PAIR_PTX, constraints="=h,=h,r,h,h",
            args=[q >> (4 * g), s.to(tl.int16, bitcast=True), z.to(tl.int16, bitcast=True)],
            dtype=(tl.int16, tl.int16), is_pure=True, pack=1,
        )
        return lo.to(tl.bfloat16, bitcast=True), hi.to(tl.bfloat16, bitcast=True)
    return _tile(q, 2 * g, s, z, MAGIC), _tile(q, 2 * g + 1, s, z, MAGIC)


@triton.jit
def _pair_f32(q, g: tl.constexpr, sz_s, sz_z):
    """The two halves of group g of a code tile as fp32 weights for the one-row kernel: the PTX of
    `_pair` (one lop3 and two fma.bf16x2 per two weights, scale and zero packed twice per int32),
    then each bf16 widened by a shift or a mask (a bf16 is the top half of its fp32)."""
    lo, hi = tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, one, off;
        lop3.b32 t, $2, 0x000F000F, 0x43004300, 0xEA;
        mov.b32 one, 0x3F803F80;
        mov.b32 off, 0xC308C308;
        fma.rn.bf16x2 t, t, one, off;
        fma.rn.bf16x2 t, t, $3, $4;
        shl.b32 $0, t, 16;
        and.b32 $1, t, 0xFFFF0000;
        }""",
        constraints="=r,=r,r,r,r",
        args=[q >> (4 * g), sz_s, sz_z],
        dtype=(tl.int32, tl.int32), is_pure=True, pack=1,
    )
    return lo.to(tl.float32, bitcast=True), hi.to(tl.float32, bitcast=True)


@triton.jit
def _twice(v):
    """A 16-bit vector as int32 words holding it in both halves (a bf16x2 operand)."""
    b = v.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return b | (b << 16)


@triton.jit
def _finish(acc, Y, YF, CNT, tile, split, numel, offs, mask, SPLIT_K: tl.constexpr, FIXUP: tl.constexpr):
    """Store a program's result at Y + split * numel (the output itself when SPLIT_K is 1, else this
    split's fp32 partial). With FIXUP the last split of an output tile to finish, counted on
    CNT[tile], adds the partials in split order and writes YF: the bits of `_sum_splits_kernel`
    with one launch fewer (about 2 us each in a graphed step). It leaves the counter at 0 for the
    next call (graph replays included)."""
    tl.store(Y + split * numel + offs, acc.to(Y.dtype.element_ty), mask=mask)
    if FIXUP:
        tl.debug_barrier()  # every thread's partial is written before the count says so
        done = tl.atomic_add(CNT + tile, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT_K - 1:
            total = tl.load(Y + offs, mask=mask, other=0.0, cache_modifier=".cg")
            for s in tl.static_range(1, SPLIT_K):
                total += tl.load(Y + s * numel + offs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(YF + offs, total.to(YF.dtype.element_ty), mask=mask)
            tl.atomic_xchg(CNT + tile, 0)


@triton.jit
def _span(K, chunks_per_split, AXIS: tl.constexpr):
    """The 128-k chunks this program's K split (program id AXIS) walks."""
    c_lo = tl.program_id(AXIS) * chunks_per_split
    return c_lo, tl.minimum(c_lo + chunks_per_split, tl.cdiv(K, 128))


@triton.jit
def _w4_dot_kernel(
    X, QW, S, Z, Y, YF, CNT, M, N, K, sxm, sym, sys, chunks_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, MAGIC: tl.constexpr,
    FIXUP: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """acc [BLOCK_M, BLOCK_N] += x tile @ dequantized W tile.T (weights as the B operand)."""
    pdl_prologue(PDL)
    kw = tl.cdiv(K, 128) * 16
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # M tiles vary fastest: see w4_matmul
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r16 = tl.arange(0, 16)
    c_lo, c_hi = _span(K, chunks_per_split, 2)
    rows_ok = rm[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(c_lo, c_hi):
        q = tl.load(QW + rn[None, :] * kw + (c * 16 + r16)[:, None])  # [16, BLOCK_N]: 128 k of each n
        for g in tl.static_range(4):  # the chunk's four groups of 32
            s = tl.load(S + (c * 4 + g) * N + rn)[None, :]
            z = tl.load(Z + (c * 4 + g) * N + rn)[None, :]
            w0, w1 = _pair(q, g, s, z, MAGIC)
            kk = c * 128 + g * 32 + r16
            a = tl.load(X + rm[:, None] * sxm + kk[None, :], mask=rows_ok & (kk[None, :] < K), other=0.0)
            acc = tl.dot(a, w0.to(a.dtype), acc)
            a = tl.load(X + rm[:, None] * sxm + kk[None, :] + 16, mask=rows_ok & (kk[None, :] + 16 < K), other=0.0)
            acc = tl.dot(a, w1.to(a.dtype), acc)
    tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    _finish(acc, Y, YF, CNT, tile, tl.program_id(2), sys, rm[:, None] * sym + rn[None, :], rows_ok, SPLIT_K, FIXUP)


@triton.jit
def _w4_swap_kernel(
    X, QW, S, Z, Y, YF, CNT, M, N, K, sxm, sym, sys, chunks_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, MAGIC: tl.constexpr,
    FIXUP: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """acc [BLOCK_N, BLOCK_M] += dequantized W tile @ x tile.T: the weights are the A operand, which the
    tensor cores take from registers (Hopper's wgmma reads only B from shared memory), so a
    dequantized tile needs no trip through shared memory; and a few rows fill wgmma's N side.
    (Interleaving a group's halves into one 32-deep operand was measured and lost 10-110 %.)"""
    pdl_prologue(PDL)
    kw = tl.cdiv(K, 128) * 16
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # M tiles vary fastest: see w4_matmul
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r16 = tl.arange(0, 16)
    c_lo, c_hi = _span(K, chunks_per_split, 2)
    rows_ok = rm[None, :] < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for c in range(c_lo, c_hi):
        q = tl.load(QW + rn[:, None] * kw + (c * 16 + r16)[None, :])  # [BLOCK_N, 16]
        for g in tl.static_range(4):
            s = tl.load(S + (c * 4 + g) * N + rn)[:, None]
            z = tl.load(Z + (c * 4 + g) * N + rn)[:, None]
            w0, w1 = _pair(q, g, s, z, MAGIC)
            kk = c * 128 + g * 32 + r16
            xt = tl.load(X + rm[None, :] * sxm + kk[:, None], mask=rows_ok & (kk[:, None] < K), other=0.0)
            acc = tl.dot(w0.to(xt.dtype), xt, acc)
            xt = tl.load(X + rm[None, :] * sxm + kk[:, None] + 16, mask=rows_ok & (kk[:, None] + 16 < K), other=0.0)
            acc = tl.dot(w1.to(xt.dtype), xt, acc)
    tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    _finish(acc, Y, YF, CNT, tile, tl.program_id(2), sys, rm[None, :] * sym + rn[:, None], rows_ok, SPLIT_K, FIXUP)


@triton.jit
def _w4_row_kernel(
    X, QW, S, Z, Y, YF, CNT, N, K, sys, chunks_per_split,
    BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, MAGIC: tl.constexpr, FIXUP: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One input row (a GEMV) on the CUDA cores: products accumulate per lane in [BLOCK_N, 16] and
    are reduced across lanes once, at the end (a reduction per tile cost more than the math).
    MAGIC 3: q' = nibble << 4 g comes out of one lop3 and one subtraction (no shift: 2^23 + q' stays
    exact below 2^23), x is scaled by 2^-4g to match, and scale and zero apply once per group."""
    pdl_prologue(PDL)
    kw = tl.cdiv(K, 128) * 16
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r16 = tl.arange(0, 16)
    c_lo, c_hi = _span(K, chunks_per_split, 1)
    acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    zacc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c in range(c_lo, c_hi):
        q = tl.load(QW + rn[:, None] * kw + (c * 16 + r16)[None, :])  # [BLOCK_N, 16]
        if MAGIC == 3:
            qh = q >> 16
        for g in tl.static_range(4):
            s16 = tl.load(S + (c * 4 + g) * N + rn)
            z16 = tl.load(Z + (c * 4 + g) * N + rn)
            s, z = s16.to(tl.float32), z16.to(tl.float32)
            kk = c * 128 + g * 32 + r16
            a0 = tl.load(X + kk, mask=kk < K, other=0.0).to(tl.float32)
            a1 = tl.load(X + kk + 16, mask=kk + 16 < K, other=0.0).to(tl.float32)
            if MAGIC == 4:
                w0, w1 = _pair_f32(q, g, _twice(s16)[:, None], _twice(z16)[:, None])
                acc += w0 * a0[None, :]
                acc += w1 * a1[None, :]
            elif MAGIC == 3:
                v0 = ((q & (0xF << (4 * g))) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                v1 = ((qh & (0xF << (4 * g))) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                p = v0 * a0[None, :] + v1 * a1[None, :]
                acc += p * (s * (1.0 / (1 << (4 * g))))[:, None]
                zacc += (z - 8.0 * s) * (tl.sum(a0, 0) + tl.sum(a1, 0))
            else:
                acc += (_nibbles(q, 2 * g, MAGIC) * s[:, None] + z[:, None]) * a0[None, :]
                acc += (_nibbles(q, 2 * g + 1, MAGIC) * s[:, None] + z[:, None]) * a1[None, :]
    _finish(tl.sum(acc, 1) + zacc, Y, YF, CNT, tl.program_id(0), tl.program_id(1), sys, rn, rn < N, SPLIT_K, FIXUP)


@triton.jit
def _sum_splits_kernel(P, Y, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Y = sum of the K splits' fp32 partials, added in split order: the same bits on every run (atomic
    adds would add in whatever order the splits finish, and greedy ids drifted between runs)."""
    pdl_prologue(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(P + s * numel + offs, mask=ok, other=0.0)
    tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=ok)


def _ptx_ok(x: torch.Tensor, w: W4Weight) -> bool:
    """The PTX paths (magic 3 of the tensor-core kernels, 4 of the one-row kernel) are written for bf16,
    and `fma.rn.bf16x2` needs sm_80."""
    if x.dtype != torch.bfloat16 or w.scales.dtype != torch.bfloat16:
        return False
    return x.device.type != "cuda" or torch.cuda.get_device_capability(x.device) >= (8, 0)


def gluon_ok(x: torch.Tensor, w: W4Weight) -> bool:
    """bf16 on a Hopper GPU (wgmma) with a Triton whose Gluon has the Hopper API, unless MESHLLM_GLUON=0
    (Gluon is Triton's experimental API: the Triton kernels then take its shapes)."""
    if os.environ.get("MESHLLM_GLUON", "1") == "0" or not _ptx_ok(x, w) or x.device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(x.device) == (9, 0) and _gluon() is not None


@functools.cache
def _gluon() -> Any:
    """engine/int4_gluon, imported on first use; None with a Triton without Gluon's Hopper API as it uses it."""
    try:
        from engine import int4_gluon
    except (ImportError, AttributeError):
        return None
    return int4_gluon


def w4_matmul(x: torch.Tensor, w: W4Weight, cfg: W4Config) -> torch.Tensor:
    """x [M, K] (16-bit) @ W.T -> [M, N] in x's dtype."""
    m, k = x.shape
    n = w.out_features
    if k != w.in_features or not fits(cfg, n):
        raise ValueError(f"launch shape {cfg} or input [{m}, {k}] does not fit a [{n}, {w.in_features}] weight")
    x = x.contiguous()
    if cfg.magic >= 3 and not _ptx_ok(x, w):  # the row kernel's 3 is plain fp32; 1 is fp32 anywhere
        cfg = dataclasses.replace(cfg, magic=3 if not cfg.block_m else 1)
    gluon = cfg.gluon and gluon_ok(x, w)
    if cfg.ws and not (gluon and _gluon().ws_ok(x, w.qw, w.scales, w.zeros)):
        cfg = plain(cfg)  # the plain kernel's tile where TMA cannot read the inputs
    chunks = w.qw.shape[1] // 16
    per_split = -(-chunks // cfg.split_k)
    y = x.new_empty(m, n)
    pdl = launch_options(x.device)
    # K splits write fp32 partials, summed in a fixed order: by the last split of each output tile
    # (FIXUP) when the weight's counters cover the tiles, else by a second kernel
    out = y if cfg.split_k == 1 else torch.empty(cfg.split_k, m, n, device=x.device, dtype=torch.float32)
    tiles = n // cfg.block_n * (1 if cfg.block_m == 0 else triton.cdiv(m, cfg.block_m))
    fixup = cfg.split_k > 1 and cfg.fixup and tiles <= w.counters.numel()
    if gluon:
        launch, fixup = (_gluon().launch_ws if cfg.ws else _gluon().launch), False
        launch(x, w.qw, w.scales, w.zeros, out, cfg.block_m, cfg.block_n, cfg.split_k, cfg.warps, cfg.stages, cfg.inflight)
    elif cfg.block_m == 0:
        if m != 1:
            raise ValueError("the one-row kernel takes M == 1")
        _w4_row_kernel[(n // cfg.block_n, cfg.split_k)](
            x, w.qw, w.scales, w.zeros, out, y, w.counters, n, k, m * n, per_split, BLOCK_N=cfg.block_n,
            SPLIT_K=cfg.split_k, MAGIC=cfg.magic, FIXUP=fixup, num_warps=cfg.warps, num_stages=cfg.stages, **pdl,
        )  # fmt: skip
    else:
        kernel = _w4_swap_kernel if cfg.swap or cfg.gluon else _w4_dot_kernel
        # programs of one weight tile run back to back, so a second row tile reads it from L2, not HBM
        kernel[(triton.cdiv(m, cfg.block_m), n // cfg.block_n, cfg.split_k)](
            x, w.qw, w.scales, w.zeros, out, y, w.counters, m, n, k, x.stride(0), n, m * n, per_split,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT_K=cfg.split_k, MAGIC=cfg.magic,
            FIXUP=fixup, num_warps=cfg.warps, num_stages=cfg.stages, **pdl,
        )  # fmt: skip
    if cfg.split_k > 1 and not fixup:
        _sum_splits_kernel[(triton.cdiv(m * n, 1024),)](out, y, m * n, SPLIT_K=cfg.split_k, BLOCK=1024, num_warps=4, **pdl)
    return y
