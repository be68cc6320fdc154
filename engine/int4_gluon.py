"""The int4 tensor-core matmul for Hopper written in Gluon, so that dequantizing overlaps the tensor cores.

Triton's `tl.dot` on a tile dequantized in registers waits for each wgmma before the next tile is
dequantized (`scripts/sass_int4.py`: a `WARPGROUP.DEPBAR.LE gsb0, 0x0` after every HGMMA), so the
ALU and the tensor cores take turns. Gluon (Triton's lower-level language) lets the kernel say what
Marlin-class kernels do: issue the wgmma asynchronously, dequantize the next 16-deep slice of weights
while it runs, and wait only for the one before (`warpgroup_mma_wait(1)`), keeping that slice's
registers alive until then. The activations go to shared memory by `cp.async`, three chunks deep,
two chunks ahead; the packed weights, scales and zeros of the next chunk are loaded into registers
while this one is multiplied.

Same layout and results as `engine/int4_triton.py`'s swapped kernel (the weights as the A operand,
`acc[n, m]`), the same PTX dequantizing (`_pair`'s magic 3), the same split-K partials. CUDA sm_90
only: Gluon kernels have no interpreter, so on CPU only the launch rule is tested, and the kernel
is compiled for sm_90 offline (tests/engine/test_int4_gluon.py).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    async_copy,
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_wait,
)

# cp.async into shared memory: `async_load` from Triton 3.7 on, `async_copy_global_to_shared` before
_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # renamed in Triton 3.7
STAGES = gl.constexpr(3)  # x chunks in shared memory: one being read by wgmma, one landing, one the last wgmma may still read


@gluon.jit
def _pair(q, g: gl.constexpr, s, z):
    """The two halves of group g (nibbles 2 g and 2 g + 1 of each word) as bf16 weights: one lop3 makes
    128 + q for both, one fma.bf16x2 subtracts 136, one applies scale and zero (int4_triton._pair)."""
    lo, hi = gl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, sc, zc, one, off;
        lop3.b32 t, $2, 0x000F000F, 0x43004300, 0xEA;
        mov.b32 one, 0x3F803F80;
        mov.b32 off, 0xC308C308;
        fma.rn.bf16x2 t, t, one, off;
        mov.b32 sc, {$3, $3};
        mov.b32 zc, {$4, $4};
        fma.rn.bf16x2 t, t, sc, zc;
        mov.b32 {$0, $1}, t;
        }""",
        constraints="=h,=h,r,h,h",
        args=[q >> (4 * g), s.to(gl.int16, bitcast=True), z.to(gl.int16, bitcast=True)],
        dtype=(gl.int16, gl.int16), is_pure=True, pack=1,
    )
    return lo.to(gl.bfloat16, bitcast=True), hi.to(gl.bfloat16, bitcast=True)


@gluon.jit
def _copy_x(X, xs, c, ok, buf, xm, xk, M, K, sxm):
    """cp.async chunk c of x (128 k of BLOCK_M rows) into shared stage `buf` (nothing read unless `ok`),
    as one copy: copies into slices of a dynamically indexed buffer would each be fenced by a barrier
    (Triton cannot tell that they do not overlap)."""
    kk = c * 128 + xk
    _cp_async(xs.index(buf), X + xm * sxm + kk, mask=(xm < M) & (kk < K) & ok)
    async_copy.commit_group()


@gluon.jit
def _load_w(QW, S, Z, c, ok, rn, r16, kw, N):
    """Chunk c's packed weights [BLOCK_N, 16] (in the wgmma A operand's layout) and its four groups'
    scales and zeros (nothing read unless `ok`: the chunk after a split's last is not fetched)."""
    q = gl.load(QW + rn[:, None] * kw + (c * 16 + r16)[None, :], mask=ok)
    s0 = gl.load(S + (c * 4 + 0) * N + rn, mask=ok)
    s1 = gl.load(S + (c * 4 + 1) * N + rn, mask=ok)
    s2 = gl.load(S + (c * 4 + 2) * N + rn, mask=ok)
    s3 = gl.load(S + (c * 4 + 3) * N + rn, mask=ok)
    z0 = gl.load(Z + (c * 4 + 0) * N + rn, mask=ok)
    z1 = gl.load(Z + (c * 4 + 1) * N + rn, mask=ok)
    z2 = gl.load(Z + (c * 4 + 2) * N + rn, mask=ok)
    z3 = gl.load(Z + (c * 4 + 3) * N + rn, mask=ok)
    return q, s0, s1, s2, s3, z0, z1, z2, z3


@gluon.jit
def _w4_wgmma_kernel(
    X, QW, S, Z, Y, M, N, K, sxm, sym, sys, chunks_per_split,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_WARPS: gl.constexpr,
):  # fmt: skip
    """acc [BLOCK_N, BLOCK_M] += dequantized W tile @ x tile.T over this program's K split."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    x_l: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[2, 16],
                                         warps_per_cta=[NUM_WARPS, 1], order=[1, 0])
    x_s: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    xs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_M, 128], x_s)

    kw = gl.cdiv(K, 128) * 16
    rn = gl.program_id(1) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, a_l))
    r16 = gl.arange(0, 16, layout=gl.SliceLayout(0, a_l))
    xm = gl.program_id(0) * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_l))[:, None]
    xk = gl.arange(0, 128, layout=gl.SliceLayout(0, x_l))[None, :]
    c_lo = gl.program_id(2) * chunks_per_split
    c_hi = gl.minimum(c_lo + chunks_per_split, gl.cdiv(K, 128))

    # x runs two chunks ahead in shared memory, the weights one chunk ahead in registers
    _copy_x(X, xs, c_lo, True, 0, xm, xk, M, K, sxm)
    _copy_x(X, xs, c_lo + 1, c_lo + 1 < c_hi, 1, xm, xk, M, K, sxm)
    q, s0, s1, s2, s3, z0, z1, z2, z3 = _load_w(QW, S, Z, c_lo, True, rn, r16, kw, N)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
    held = gl.zeros([BLOCK_N, 16], gl.bfloat16, layout=a_l)  # the A operand of the wgmma in flight
    for c in range(c_lo, c_hi):
        buf = (c - c_lo) % STAGES
        async_copy.wait_group(1)  # this chunk's x has landed (this thread's copies; the next may not) ...
        _barrier()  # ... and everyone's
        fence_async_shared()  # the copies (generic proxy) before the wgmma reads (async proxy)
        qn, s0n, s1n, s2n, s3n, z0n, z1n, z2n, z3n = _load_w(QW, S, Z, c + 1, c + 1 < c_hi, rn, r16, kw, N)
        for g in gl.static_range(4):
            if g == 0:
                s, z = s0, z0
            elif g == 1:
                s, z = s1, z1
            elif g == 2:
                s, z = s2, z2
            else:
                s, z = s3, z3
            w0, w1 = _pair(q, g, s[:, None], z[:, None])
            acc = warpgroup_mma(w0, xs.index(buf).slice(32 * g, 16, dim=1).permute((1, 0)), acc, is_async=True)
            acc, held = warpgroup_mma_wait(num_outstanding=1, deps=[acc, held])
            held = w0
            acc = warpgroup_mma(w1, xs.index(buf).slice(32 * g + 16, 16, dim=1).permute((1, 0)), acc, is_async=True)
            acc, held = warpgroup_mma_wait(num_outstanding=1, deps=[acc, held])
            held = w1
        # the stage two chunks on was the previous chunk's: all its wgmma are done (each warp group
        # waited past them above; Triton puts a barrier before this write for the other warp group)
        _copy_x(X, xs, c + 2, c + 2 < c_hi, (buf + 2) % STAGES, xm, xk, M, K, sxm)
        q = qn
        s0, s1, s2, s3 = s0n, s1n, s2n, s3n
        z0, z1, z2, z3 = z0n, z1n, z2n, z3n
    acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
    async_copy.wait_group(0)
    ym = gl.program_id(0) * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma))
    yn = gl.program_id(1) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    offs = gl.program_id(2) * sys + ym[None, :] * sym + yn[:, None]
    gl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=ym[None, :] < M)


def launch(x: torch.Tensor, qw: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, out: torch.Tensor,
           block_m: int, block_n: int, split_k: int, warps: int) -> None:
    """One launch over x [M, K] (bf16, contiguous) into `out` ([M, N] bf16 when split_k is 1, else the
    [split_k, M, N] fp32 partials)."""
    m, k = x.shape
    n = qw.shape[0]
    chunks = qw.shape[1] // 16
    per_split = -(-chunks // split_k)
    grid = (-(-m // block_m), n // block_n, split_k)
    _w4_wgmma_kernel[grid](
        x, qw, scales, zeros, out, m, n, k, x.stride(0), n, m * n, per_split,
        BLOCK_M=block_m, BLOCK_N=block_n, NUM_WARPS=warps, num_warps=warps,
    )  # fmt: skip
