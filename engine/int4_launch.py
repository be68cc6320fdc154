"""Launch shapes of the int4 Triton kernels (engine/int4_triton.py): the type and the rule, pure.

`launch_for` is fitted to `scripts/bench_int4_gemm.py`'s sweeps on an H200 (Llama-3-8B layer shapes,
docs/benchmarks.md); it imports no Triton, so it is tested on any machine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class W4Config:
    """One launch shape; `block_m` 0 selects the one-row kernel (M == 1), `swap` the kernel with the
    weights as the A operand. K is walked in chunks of 128."""

    block_m: int
    block_n: int
    split_k: int
    warps: int
    stages: int  # software pipeline depth (the Gluon kernel: chunks in shared memory, at least 3)
    magic: int = 1  # int -> float: 0 conversion, 1 fp32 mantissa trick, 2 bf16 math, 3 PTX bf16x2 (one-row: 3 fp32 factored, 4 PTX)
    swap: bool = False
    fixup: bool = False  # K splits: the last one of a tile sums them (else a second kernel does)
    # the Gluon kernel (engine/int4_gluon.py: asynchronous wgmma, Hopper); elsewhere the swapped Triton
    # kernel runs the same tile
    gluon: bool = False
    inflight: int = 1  # the Gluon kernel: wgmma left in flight while the next slice is dequantized (1 or 2)
    ws: bool = False  # the Gluon kernel's warp-specialized TMA form (256-wide tiles); elsewhere `plain()`'s tile


def plain(cfg: W4Config) -> W4Config:
    """What runs a warp-specialized shape where that kernel cannot (no TMA: unaligned input, another
    GPU, MESHLLM_GLUON=0): the 128-wide tile it replaced."""
    return dataclasses.replace(cfg, ws=False, block_n=min(cfg.block_n, 128), stages=max(cfg.stages, 4)) if cfg.ws else cfg


def fits(cfg: W4Config, n: int) -> bool:
    """Whether a launch shape tiles N exactly (the kernels carry no N mask)."""
    return n % cfg.block_n == 0



def launch_for(m: int, n: int, k: int = 4096, gluon: bool = False) -> W4Config:
    """The launch shape for M rows of an [N, K] weight: the winners of `scripts/bench_int4_gemm.py` on an
    H200 (Llama-3-8B layer shapes, docs/benchmarks.md), as a rule of M, N and K. `gluon`: whether the
    Gluon kernel can run here (engine/int4_gluon.py, Hopper); it then takes every shape (at one row
    too: gate/up 32.0 us against the one-row kernel's 38.2)."""
    if gluon:
        return _gluon_shape(m, n, k)
    wide = n >= 16384
    if m == 1:  # BLOCK_N 64 beat 128 by 1.3-1.7x with the PTX path (fewer registers, more programs resident)
        # the last split of a tile sums the partials: qkv 10.9 us against 12.3 with a second kernel; in
        # the tensor-core kernels the one program summing up to 16 tiles cost more than it saved (a
        # decode step at batch 8: 1,654 tok/s against 1,927)
        cfg = W4Config(0, 64, 4 if wide else 8, 4, 3, magic=4, fixup=True)
    elif m <= 16:
        cfg = W4Config(16, 64, 4, 4, 3, magic=3) if wide else W4Config(16, 64, 16 if n <= 4096 else 8, 4, 2, magic=3)
    elif m <= 32:
        if wide:
            cfg = W4Config(32, 128, 4, 8, 3, magic=3)
        else:  # o and down: the weights as the B operand; qkv's 6,144: as the A operand
            cfg = W4Config(32, 128, 8, 8, 3, magic=3) if n <= 4096 else W4Config(32, 128, 8, 8, 2, magic=3, swap=True)
    else:
        # from 33 rows: 128-wide tiles of 8 warps, weights as the A operand. gate/up at 64 rows runs best
        # on 128-row tiles, half of them padding (85 us against 131 with 64 x 64 tiles): the larger
        # tensor-core instruction and two warp groups per program hide more latency than the padding costs
        splits = 8 if k > 8192 else 5 if n > 4096 else 4
        cfg = W4Config(128 if wide or m > 64 else 64, 128, 1 if wide else splits, 8, 3, magic=3, swap=True)
    return _narrowed(cfg, n)


def _gluon_shape(m: int, n: int, k: int) -> W4Config:
    """The Gluon kernel's shape, four chunks deep. Up to 32 rows: 64-wide tiles of one warp group in row
    tiles of 16 or 32, four K splits (eight for down's long K, two for wide N at 32 rows). Above, in row
    tiles of 64 or 128 with two wgmma in flight: o on the plain kernel's 64-wide tiles (64-row tiles,
    four splits; 128-row tiles, two), down up to 64 rows likewise; the rest on the warp-specialized
    kernel (`ws`) with 128-wide tiles of two warp groups, wide N (gate/up, the head) unsplit and 256
    wide up to 64 rows, qkv in two K splits and down in four. Fitted to H200 sweeps (`bench_int4_gemm.py
    --rows 64 128 --gluon` and the warp-specialized kernel's, docs/benchmarks.md): at 128 rows gate/up
    59.8 us against the plain kernel's 73.9 (bf16 66.3), down 34.2 against 38.9, qkv 21.2 against 22.7,
    the head 248.6 against 292.6; o stays faster on the plain kernel (14.9 against 17.7)."""
    wide, ws = n >= 16384, False
    if m <= 32:
        block_m, block_n, warps = (16 if m <= 16 else 32), 64, 4
        splits = 8 if k > 8192 and m <= 16 else 2 if wide and m > 16 else 4
    elif (n <= 4096 and k <= 4096) or (k > 8192 and m <= 64 and not wide):
        block_m, block_n, warps = (64 if m <= 64 else 128), 64, 4
        splits = 4 if m <= 64 or k > 8192 else 2
    else:
        block_m, block_n, warps, ws = (64 if m <= 64 else 128), (256 if wide and m <= 64 and n % 256 == 0 else 128), 8, True
        splits = 1 if wide else 4 if k > 8192 else 2
    splits = max(1, min(splits, k // 256))  # at least two 128-k chunks a split
    cfg = W4Config(block_m, block_n, splits, warps, 4, magic=3, swap=True, gluon=True, inflight=2 if m > 32 else 1, ws=ws)
    if ws and n % block_n:
        cfg = plain(cfg)  # the warp-specialized kernel has no narrower tile
    return _narrowed(cfg, n)


def _narrowed(cfg: W4Config, n: int) -> W4Config:
    for block_n in dict.fromkeys((cfg.block_n, 64, 32, 16)):  # N that the tile does not divide (small models)
        if n % block_n == 0:  # Gluon: one warp group below 128 wide (two would each hold the same 64 rows)
            warps = min(cfg.warps, 4) if cfg.gluon and block_n < 128 else cfg.warps
            return dataclasses.replace(cfg, block_n=block_n, warps=warps)
    raise ValueError(f"N={n} is not a multiple of 16")
