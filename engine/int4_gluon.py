"""The int4 tensor-core matmul for Hopper written in Gluon, so that dequantizing overlaps the tensor cores.

Triton's `tl.dot` on a tile dequantized in registers waits for each wgmma before the next tile is
dequantized (`scripts/sass_int4.py`: a `WARPGROUP.DEPBAR.LE gsb0, 0x0` after every HGMMA), so the
ALU and the tensor cores take turns. Gluon (Triton's lower-level language) lets the kernel say what
Marlin-class kernels do: issue the wgmma asynchronously, dequantize the next 16-deep slice of weights
while it runs, and wait only for the one before (`warpgroup_mma_wait(1)`), keeping that slice's
registers alive until then. Everything a 128-k chunk reads (activations, packed weights, scales,
zeros) goes to shared memory by `cp.async`, several chunks ahead (Marlin's schedule): more bytes in
flight per program than a chunk held in registers (4 stages against the next chunk in registers:
1.2-1.3x faster on most Llama-3-8B shapes at 1-128 rows on the H200, docs/benchmarks.md).

`launch_ws` is the warp-specialized form for 128-row tiles of wide matrices (gate/up, the head): one
producer warp streams every chunk's inputs into shared memory by TMA (an mbarrier per stage says
ready, another says empty), and the consumer warp groups only dequantize and multiply. Its point is
registers: the producer gives its share back (`setmaxnreg`), so two consumer warp groups get 240
each and hold a 256-wide tile with no spills, which reads x half as often as 128-wide tiles (gate/up at
128 rows 64.8 us against 74.0, and cuBLAS's bf16 66.6; at 64 rows and on the narrower matrices it
was slower, docs/benchmarks.md).

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
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from engine.int4_triton import PAIR_PTX
from engine.pdl import launch_options

# cp.async into shared memory: `async_load` from Triton 3.7 on, `async_copy_global_to_shared` before
_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # renamed in Triton 3.7
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # renamed in Triton 3.7


@gluon.jit
def _pair(q, g: gl.constexpr, s, z):
    """The two halves of group g (nibbles 2 g and 2 g + 1 of each word) as bf16 weights: one lop3 makes
    128 + q for both, one fma.bf16x2 subtracts 136, one applies scale and zero (int4_triton._pair)."""
    lo, hi = gl.inline_asm_elementwise(
        asm=PAIR_PTX, constraints="=h,=h,r,h,h",
        args=[q >> (4 * g), s.to(gl.int16, bitcast=True), z.to(gl.int16, bitcast=True)],
        dtype=(gl.int16, gl.int16), is_pure=True, pack=1,
    )
    return lo.to(gl.bfloat16, bitcast=True), hi.to(gl.bfloat16, bitcast=True)


@gluon.jit
def _group(q, g: gl.constexpr, s, z, xb, acc, held1, held2, INFLIGHT: gl.constexpr):
    """Group g of a chunk (k 32 g to 32 g + 32): its two 16-deep weight slices dequantized, each
    multiplied by x's slice `xb` asynchronously, waiting until INFLIGHT wgmma are left; `held1` and
    `held2` keep the registers of those still reading their A operand alive."""
    w0, w1 = _pair(q, g, s[:, None], z[:, None])
    acc = warpgroup_mma(w0, xb.slice(32 * g, 16, dim=1).permute((1, 0)), acc, is_async=True)
    acc, held1, held2 = warpgroup_mma_wait(num_outstanding=INFLIGHT, deps=[acc, held1, held2])
    held1, held2 = w0, held1
    acc = warpgroup_mma(w1, xb.slice(32 * g + 16, 16, dim=1).permute((1, 0)), acc, is_async=True)
    acc, held1, held2 = warpgroup_mma_wait(num_outstanding=INFLIGHT, deps=[acc, held1, held2])
    return acc, w1, held1


@gluon.jit
def _pdl_prologue(PDL: gl.constexpr):
    """engine/pdl.py's `pdl_prologue` in Gluon: wait for the previous kernel, then let the next launch."""
    if PDL:
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)  # fmt: skip


@gluon.jit
def _copy_chunk(X, QW, S, Z, xs, qs, ss, zs, c, ok, buf, xm, xk, wn, wk, gi, gn, M, N, K, sxm, kw):
    """cp.async all of chunk c a program reads into shared stage `buf` (nothing unless `ok`): x [BLOCK_M,
    128], the packed weights [BLOCK_N, 16], and the four groups' scales and zeros [4 * BLOCK_N]."""
    kk = c * 128 + xk
    _cp_async(xs.index(buf), X + xm * sxm + kk, mask=(xm < M) & (kk < K) & ok)
    _cp_async(qs.index(buf), QW + wn * kw + c * 16 + wk, mask=ok)
    _cp_async(ss.index(buf), S + (c * 4 + gi) * N + gn, mask=ok)
    _cp_async(zs.index(buf), Z + (c * 4 + gi) * N + gn, mask=ok)
    async_copy.commit_group()


@gluon.jit
def _w4_wgmma_kernel(
    X, QW, S, Z, Y, M, N, K, sxm, sym, sys, chunks_per_split,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_WARPS: gl.constexpr, DEPTH: gl.constexpr, INFLIGHT: gl.constexpr,
    PDL: gl.constexpr,
):  # fmt: skip
    """acc [BLOCK_N, BLOCK_M] += dequantized W tile @ x tile.T over this program's K split. Everything a
    chunk reads (x, packed weights, scales, zeros) streams into shared memory DEPTH chunks deep
    (Marlin's schedule); DEPTH - 1 chunks are in flight while one is multiplied. INFLIGHT (1 or 2)
    wgmma stay in flight while the next slice is dequantized."""
    _pdl_prologue(PDL)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    x_l: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[2, 16],
                                         warps_per_cta=[NUM_WARPS, 1], order=[1, 0])
    q_l: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[8, 4],
                                         warps_per_cta=[NUM_WARPS, 1], order=[1, 0])
    g_l: gl.constexpr = gl.BlockedLayout(size_per_thread=[8], threads_per_warp=[32], warps_per_cta=[NUM_WARPS],
                                         order=[0])
    xs = gl.allocate_shared_memory(gl.bfloat16, [DEPTH, BLOCK_M, 128],
                                   gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2))
    qs = gl.allocate_shared_memory(gl.int32, [DEPTH, BLOCK_N, 16],
                                   gl.SwizzledSharedLayout(vec=4, per_phase=1, max_phase=4, order=[1, 0]))
    flat: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    ss = gl.allocate_shared_memory(gl.bfloat16, [DEPTH, 4 * BLOCK_N], flat)
    zs = gl.allocate_shared_memory(gl.bfloat16, [DEPTH, 4 * BLOCK_N], flat)

    kw = gl.cdiv(K, 128) * 16
    xm = gl.program_id(0) * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_l))[:, None]
    xk = gl.arange(0, 128, layout=gl.SliceLayout(0, x_l))[None, :]
    wn = gl.program_id(1) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, q_l))[:, None]
    wk = gl.arange(0, 16, layout=gl.SliceLayout(0, q_l))[None, :]
    i = gl.arange(0, 4 * BLOCK_N, layout=g_l)
    gi = i // BLOCK_N
    gn = gl.program_id(1) * BLOCK_N + i % BLOCK_N
    c_lo = gl.program_id(2) * chunks_per_split
    c_hi = gl.minimum(c_lo + chunks_per_split, gl.cdiv(K, 128))
    for d in gl.static_range(DEPTH - 1):
        _copy_chunk(X, QW, S, Z, xs, qs, ss, zs, c_lo + d, c_lo + d < c_hi, d, xm, xk, wn, wk, gi, gn, M, N, K, sxm, kw)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
    # the A operands of the wgmma in flight (registers a wgmma reads until it completes)
    held1 = gl.zeros([BLOCK_N, 16], gl.bfloat16, layout=a_l)
    held2 = gl.zeros([BLOCK_N, 16], gl.bfloat16, layout=a_l)
    for c in range(c_lo, c_hi):
        buf = (c - c_lo) % DEPTH
        async_copy.wait_group(DEPTH - 2)  # chunk c has landed (the DEPTH - 2 after it may not have)
        _barrier()
        fence_async_shared()
        q = qs.index(buf).load(a_l)
        for g in gl.static_range(4):
            s = ss.index(buf).slice(g * BLOCK_N, BLOCK_N).load(gl.SliceLayout(1, a_l))
            z = zs.index(buf).slice(g * BLOCK_N, BLOCK_N).load(gl.SliceLayout(1, a_l))
            acc, held1, held2 = _group(q, g, s, z, xs.index(buf), acc, held1, held2, INFLIGHT)
        # into the previous chunk's stage: every wgmma that read it is done (each warp group waited past
        # them above; Triton puts a barrier before this write for the other warp group)
        nc = c + DEPTH - 1
        _copy_chunk(X, QW, S, Z, xs, qs, ss, zs, nc, nc < c_hi, (buf + DEPTH - 1) % DEPTH, xm, xk, wn, wk, gi, gn,
                    M, N, K, sxm, kw)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
    async_copy.wait_group(0)
    ym = gl.program_id(0) * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma))
    yn = gl.program_id(1) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    offs = gl.program_id(2) * sys + ym[None, :] * sym + yn[:, None]
    gl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=ym[None, :] < M)


def launch(x: torch.Tensor, qw: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, out: torch.Tensor,
           block_m: int, block_n: int, split_k: int, warps: int, depth: int, inflight: int = 1) -> None:
    """One launch over x [M, K] (bf16, contiguous) into `out` ([M, N] bf16 when split_k is 1, else the
    [split_k, M, N] fp32 partials), `depth` chunks of each program's inputs in shared memory (>= 3:
    a chunk is copied into the stage two chunks back, whose last wgmma may have been in flight)."""
    if depth < 3 or inflight not in (1, 2):
        raise ValueError(f"the Gluon kernel streams at least 3 chunks deep with 1 or 2 wgmma in flight, not {depth}, {inflight}")
    m, k = x.shape
    n = qw.shape[0]
    chunks = qw.shape[1] // 16
    per_split = -(-chunks // split_k)
    _w4_wgmma_kernel[(-(-m // block_m), n // block_n, split_k)](
        x, qw, scales, zeros, out, m, n, k, x.stride(0), n, m * n, per_split,
        BLOCK_M=block_m, BLOCK_N=block_n, NUM_WARPS=warps, DEPTH=depth, INFLIGHT=inflight, num_warps=warps, **launch_options(x.device),
    )  # fmt: skip


@gluon.jit
def _ws_producer(x_desc, q_desc, s_desc, z_desc, xs, qs, ss, zs, ready, empty, c_lo, n_chunks, m0, n0, N):
    """One warp: chunk c's x [BLOCK_M, 128], packed weights [BLOCK_N, 16], and its four groups' scales
    and zeros (one 1-D box per group: they are rows of [groups, N]) into stage c % DEPTH by TMA, once
    the consumers have released that stage."""
    DEPTH: gl.constexpr = xs.type.shape[0]
    nbytes: gl.constexpr = x_desc.block_type.nbytes + q_desc.block_type.nbytes + 8 * s_desc.block_type.nbytes
    for i in range(n_chunks):
        c = c_lo + i
        buf = i % DEPTH
        mbarrier.wait(empty.index(buf), (i // DEPTH & 1) ^ 1)  # a new mbarrier counts as released once
        bar = ready.index(buf)
        mbarrier.expect(bar, nbytes)
        _tma_load(x_desc, [m0, c * 128], bar, xs.index(buf))  # rows past M and k past K arrive as zeros
        _tma_load(q_desc, [n0, c * 16], bar, qs.index(buf))
        for g in gl.static_range(4):
            _tma_load(s_desc, [(c * 4 + g) * N + n0], bar, ss.index(buf * 4 + g))
            _tma_load(z_desc, [(c * 4 + g) * N + n0], bar, zs.index(buf * 4 + g))


@gluon.jit
def _ws_consumer(xs, qs, ss, zs, ready, empty, n_chunks, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
                 NUM_WARPS: gl.constexpr, INFLIGHT: gl.constexpr):
    """The default partition: `_w4_wgmma_kernel`'s loop, waiting on a stage's mbarrier instead of its
    copies, and releasing the stage before once no wgmma reads it."""
    DEPTH: gl.constexpr = xs.type.shape[0]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
    held1 = gl.zeros([BLOCK_N, 16], gl.bfloat16, layout=a_l)
    held2 = gl.zeros([BLOCK_N, 16], gl.bfloat16, layout=a_l)
    for i in range(n_chunks):
        buf = i % DEPTH
        mbarrier.wait(ready.index(buf), i // DEPTH & 1)
        q = qs.index(buf).load(a_l)
        for g in gl.static_range(4):
            s = ss.index(buf * 4 + g).load(gl.SliceLayout(1, a_l))
            z = zs.index(buf * 4 + g).load(gl.SliceLayout(1, a_l))
            acc, held1, held2 = _group(q, g, s, z, xs.index(buf), acc, held1, held2, INFLIGHT)
        if i > 0:
            # at most INFLIGHT (<= 2) wgmma are outstanding, both this chunk's: none reads the stage
            # before, which the producer may now refill (the fence orders our reads before its TMA)
            fence_async_shared()
            mbarrier.arrive(empty.index((i + DEPTH - 1) % DEPTH), count=1)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
    return (acc,)  # a tuple: Triton 3.6 flattens the default partition's results as one


@gluon.jit
def _w4_ws_kernel(x_desc, q_desc, s_desc, z_desc, Y, M, N, K, sym, sys, chunks_per_split,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_WARPS: gl.constexpr, DEPTH: gl.constexpr,
                  INFLIGHT: gl.constexpr, PDL: gl.constexpr):  # fmt: skip
    """`_w4_wgmma_kernel`'s tile and results, warp-specialized (module docstring)."""
    _pdl_prologue(PDL)
    xs = gl.allocate_shared_memory(x_desc.dtype, [DEPTH] + x_desc.block_type.shape, x_desc.layout)
    qs = gl.allocate_shared_memory(q_desc.dtype, [DEPTH] + q_desc.block_type.shape, q_desc.layout)
    ss = gl.allocate_shared_memory(s_desc.dtype, [DEPTH * 4] + s_desc.block_type.shape, s_desc.layout)
    zs = gl.allocate_shared_memory(z_desc.dtype, [DEPTH * 4] + z_desc.block_type.shape, z_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [DEPTH, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [DEPTH, 1], mbarrier.MBarrierLayout())
    for d in gl.static_range(DEPTH):
        mbarrier.init(ready.index(d), count=1)
        mbarrier.init(empty.index(d), count=1)
    m0 = gl.program_id(0) * BLOCK_M
    n0 = gl.program_id(1) * BLOCK_N
    c_lo = gl.program_id(2) * chunks_per_split
    # At least one chunk, so the compiler sees no path that skips the loop: on such a path it would set
    # the accumulator before the final wgmma wait, and ptxas then serializes every wgmma (C7515). An
    # empty K split's one chunk lies past K, which TMA reads as zeros: its partial sums add nothing.
    n_chunks = gl.maximum(gl.minimum(c_lo + chunks_per_split, gl.cdiv(K, 128)) - c_lo, 1)
    (acc,) = gl.warp_specialize([
        (_ws_consumer, (xs, qs, ss, zs, ready, empty, n_chunks, BLOCK_N, BLOCK_M, NUM_WARPS, INFLIGHT)),
        (_ws_producer, (x_desc, q_desc, s_desc, z_desc, xs, qs, ss, zs, ready, empty, c_lo, n_chunks, m0, n0, N)),
    ], [1], [40])  # fmt: skip
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    ym = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma))
    yn = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    offs = gl.program_id(2) * sys + ym[None, :] * sym + yn[:, None]
    gl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=ym[None, :] < M)


WS_LAYOUTS = {  # the shared layouts TMA writes: x and the weights swizzled for the loads that read them
    "x": gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2),
    "q": gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=32, rank=2),
    "g": gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=1),
}


def ws_ok(x: torch.Tensor, qw: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> bool:
    """Whether TMA can read these: 16-byte aligned bases and rows (x's K a multiple of 8)."""
    return (x.stride(1) == 1 and x.stride(0) % 8 == 0
            and all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (x, qw, scales, zeros)))


def launch_ws(x: torch.Tensor, qw: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, out: torch.Tensor,
              block_m: int, block_n: int, split_k: int, warps: int, depth: int, inflight: int = 1) -> None:
    """`launch`'s contract, on the warp-specialized kernel (`ws_ok` must hold; `block_n` <= 256)."""
    if depth < 2 or inflight not in (1, 2) or block_n > 256:
        raise ValueError(f"the warp-specialized kernel takes depth >= 2, 1 or 2 wgmma in flight and tiles of at most 256, "
                         f"not {depth}, {inflight}, {block_n}")
    m, k = x.shape
    n = qw.shape[0]
    chunks = qw.shape[1] // 16
    per_split = -(-chunks // split_k)
    x_desc = TensorDescriptor.from_tensor(x, [block_m, 128], WS_LAYOUTS["x"])
    q_desc = TensorDescriptor.from_tensor(qw, [block_n, 16], WS_LAYOUTS["q"])
    s_desc = TensorDescriptor.from_tensor(scales.view(-1), [block_n], WS_LAYOUTS["g"])
    z_desc = TensorDescriptor.from_tensor(zeros.view(-1), [block_n], WS_LAYOUTS["g"])
    _w4_ws_kernel[(-(-m // block_m), n // block_n, split_k)](
        x_desc, q_desc, s_desc, z_desc, out, m, n, k, n, m * n, per_split,
        BLOCK_M=block_m, BLOCK_N=block_n, NUM_WARPS=warps, DEPTH=depth, INFLIGHT=inflight, num_warps=warps,
        **launch_options(x.device),
    )  # fmt: skip
