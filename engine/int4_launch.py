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
    stages: int
    magic: int = 1  # int -> float: 0 conversion, 1 fp32 mantissa trick, 2 bf16 math, 3 PTX bf16x2 (one-row: 3 fp32 factored, 4 PTX)
    swap: bool = False
    fixup: bool = False  # K splits: the last one of a tile sums them (else a second kernel does)


def fits(cfg: W4Config, n: int) -> bool:
    """Whether a launch shape tiles N exactly (the kernels carry no N mask)."""
    return n % cfg.block_n == 0



def launch_for(m: int, n: int) -> W4Config:
    """The launch shape for M rows of an [N, K] weight: the winners of `scripts/bench_int4_gemm.py` on an
    H200 (Llama-3-8B layer shapes, docs/benchmarks.md), as a rule of M and N. Few output tiles (N <
    16,384) want more K splits to fill 132 SMs; the one-row kernel wins at M = 1, tensor-core kernels
    above it; the PTX dequantizing paths (magic 3, the one-row kernel's 4) won or tied on most shapes
    (not o and down at 32 rows)."""
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
        else:  # N = 4,096 (o, down): bf16 math and a deeper pipeline won; qkv's 6,144: the PTX path
            cfg = W4Config(32, 128, 8, 8, 3, magic=2, swap=True) if n <= 4096 else W4Config(32, 128, 8, 8, 2, magic=3, swap=True)
    elif m <= 64:
        cfg = W4Config(64, 64, 1 if wide else 4, 4, 2, magic=3, swap=True)
    elif wide:
        cfg = W4Config(128, 128, 1, 8, 3, magic=3, swap=True)
    else:
        cfg = W4Config(64, 64, 2, 4, 3, magic=3, swap=True) if n > 4096 else W4Config(64, 64, 4, 4, 2, magic=3, swap=True)
    for block_n in (cfg.block_n, 32, 16):  # N that the tile does not divide (small models)
        if n % block_n == 0:
            return dataclasses.replace(cfg, block_n=block_n)
    raise ValueError(f"N={n} is not a multiple of 16")
