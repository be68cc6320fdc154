"""The Gluon int4 kernel (engine/int4_gluon.py): compiled for Hopper here, run against a float reference
on an H200.

Gluon kernels have no interpreter, so CI (no GPU) compiles the kernel for sm_90 with the Triton it
has and checks the machine code for what the kernel exists for: asynchronous wgmma that waits for
all but the last one in flight, and one barrier a chunk. On a GPU the results are compared with
float64 and with the Triton kernel it replaces (same tile, same PTX dequantizing).
"""

import dataclasses
import re

import pytest
import torch

pytest.importorskip("triton")
gluon = pytest.importorskip("triton.experimental.gluon")

from engine.int4_launch import W4Config, launch_for  # noqa: E402
from engine.int4_triton import pack_int4  # noqa: E402


@pytest.mark.parametrize("block_m,block_n,warps,depth", [(64, 128, 8, 4), (16, 64, 4, 4), (128, 128, 8, 4), (32, 64, 4, 6),
                                                         (64, 256, 16, 4)])
def test_the_kernel_compiles_for_hopper_with_asynchronous_wgmma(block_m: int, block_n: int, warps: int, depth: int) -> None:
    """sm_90 machine code from this machine's Triton: 8 wgmma a 128-k chunk, each followed by a wait
    that leaves it in flight (`DEPBAR.LE gsb0, 0x1`, the point of the kernel), none that drains all
    but at the end; the copies of a chunk (x, weights, scales, zeros: one commit group each) with no
    barrier among them (there was one after each of eight per-slice copies of x), and DEPTH - 1
    chunks copied before the loop. With Triton 3.9 the 8-warp build also has a barrier after each
    wgmma wait (3.6, which the H200 measurements used, has two a chunk)."""
    pytest.importorskip("triton.backends.nvidia")
    from scripts.sass_int4 import sass

    consts: dict[str, object] = {"BLOCK_M": block_m, "BLOCK_N": block_n, "NUM_WARPS": warps, "DEPTH": depth, "INFLIGHT": 1, "PDL": True}
    code = sass("gluon", consts, warps, 1)
    mma = re.findall(r"HGMMA\.64x(\d+)x16\.F32\.BF16", code)
    assert len(mma) == 8 and set(mma) == {str(block_m)}, mma
    waits = re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[01])", code)
    assert waits.count("0x1") == 8 and waits.count("0x0") == 1, waits
    groups, copying = 0, False  # LDGSTS runs closed by LDGDEPBAR (commit_group)
    for line in code.splitlines():
        if "LDGSTS" in line:
            copying = True
        elif "LDGDEPBAR" in line:
            groups += copying
            copying = False
        assert not (copying and "BAR.SYNC" in line), line
    assert groups == depth, groups  # DEPTH - 1 before the loop, one in it


def _random_weight(n: int, k: int, g: torch.Generator) -> tuple:
    """A random int4 weight [N, K] on the GPU, packed, and the same weight in float64."""
    q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.uint8, generator=g)
    s = (torch.rand(n, k // 32, device="cuda", generator=g) * 0.02).bfloat16()
    z = (torch.randn(n, k // 32, device="cuda", generator=g) * 0.02).bfloat16()
    w = ((q.double().view(n, -1, 32) - 8) * s.double()[..., None] + z.double()[..., None]).view(n, k)
    return pack_int4(q, s, z), w


@pytest.mark.parametrize("block_m,block_n,depth", [(128, 128, 4), (64, 256, 4), (128, 256, 3)])
def test_the_warp_specialized_kernel_compiles_with_tma_and_asynchronous_wgmma(block_m: int, block_n: int,
                                                                            depth: int) -> None:
    """sm_90 machine code of `_w4_ws_kernel`: every input arrives by TMA (no cp.async), the producer
    gives its registers to the consumers (setmaxnreg), and the wgmma stay asynchronous: each wait
    leaves two in flight. A path that could skip the chunk loop once made ptxas serialize every
    wgmma (all waits 0x0, C7515), which cost more than the warp specialization gained."""
    pytest.importorskip("triton.backends.nvidia")
    from scripts.sass_int4 import sass

    consts: dict[str, object] = {"BLOCK_M": block_m, "BLOCK_N": block_n, "NUM_WARPS": 8, "DEPTH": depth, "INFLIGHT": 2, "PDL": True}
    code = sass("gluon_ws", consts, 8, 1)
    assert len(re.findall(rf"HGMMA\.64x{block_m}x16\.F32\.BF16", code)) == 8 * block_n // 128
    assert "UTMALDG" in code and "LDGSTS" not in code
    assert re.search(r"USETMAXREG\.DEALLOC\S* 0x18", code) and re.search(r"USETMAXREG\.TRY_ALLOC\S* \w+, 0xf0", code)
    waits = re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9])", code)
    assert waits.count("0x2") == 8 and waits.count("0x0") == 1, waits


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="runs on Hopper (wgmma)")
def test_the_warp_specialized_kernel_matches_float64_and_the_plain_kernel() -> None:
    """Rows 1-200 (padded tiles, two row tiles), K splits (an empty one: 5 chunks in 4 splits), a K tail
    (576), 128- and 256-wide tiles, depths 2-4: against float64 and the plain kernel's tile."""
    from engine.int4_launch import plain
    from engine.int4_triton import w4_matmul

    g = torch.Generator(device="cuda").manual_seed(7)
    for n, k in [(512, 4096), (256, 576), (768, 1536)]:
        pw, w = _random_weight(n, k, g)
        for m, bm, bn, sk, st in [(1, 64, 128, 1, 4), (65, 128, 128, 2, 4), (128, 128, 256, 1, 3), (200, 128, 128, 4, 2),
                                  (40, 64, 256, 3, 4), (128, 128, 128, 4, 4), (100, 64, 128, 1, 3)]:  # fmt: skip
            if n % bn:
                continue
            cfg = W4Config(bm, bn, sk, 8, st, magic=3, swap=True, gluon=True, inflight=2, ws=True)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            y = w4_matmul(x, pw, cfg)
            ref = x.double() @ w.T
            assert float((y.double() - ref).norm() / ref.norm()) < 1e-2 and not y.isnan().any(), (n, k, m, cfg)
            plain_y = w4_matmul(x, pw, plain(cfg))
            assert float((y.double() - plain_y.double()).norm() / ref.norm()) < 4e-3, (n, k, m, cfg)


def test_tma_needs_16_byte_alignment() -> None:
    """Pure: what `w4_matmul` checks before the warp-specialized kernel (else `plain(cfg)` runs)."""
    from engine.int4_gluon import ws_ok

    w = pack_int4(torch.zeros(128, 256, dtype=torch.uint8), torch.ones(128, 8).bfloat16(), torch.zeros(128, 8).bfloat16())
    x = torch.zeros(4, 256, dtype=torch.bfloat16)
    assert ws_ok(x, w.qw, w.scales, w.zeros)
    shifted = torch.zeros(4 * 256 + 4, dtype=torch.bfloat16)[4:].view(4, 256)  # 8 bytes off
    assert not ws_ok(shifted, w.qw, w.scales, w.zeros)
    assert not ws_ok(torch.zeros(4, 260, dtype=torch.bfloat16)[:, :256], w.qw, w.scales, w.zeros)  # rows of 520 B


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="runs on Hopper (wgmma)")
def test_the_gluon_kernel_matches_float64_and_the_triton_kernel() -> None:
    """Rows 1-128 (padded tiles, several row tiles), K splits, a K tail (576 = 4.5 chunks), N that
    only 64-wide tiles divide: against float64, and within bf16 rounding of the swapped Triton kernel
    on the same tile."""
    from engine.int4_triton import w4_matmul

    g = torch.Generator(device="cuda").manual_seed(5)
    for n, k in [(256, 4096), (192, 576), (4096, 14336)]:
        pw, w = _random_weight(n, k, g)
        for m, bm, bn, sk, st in [(1, 16, 64, 1, 3), (5, 16, 64, 3, 3), (16, 16, 64, 2, 3), (33, 32, 64, 1, 3),
                                  (64, 64, 64, 4, 3), (100, 64, 64, 2, 3), (128, 128, 64, 1, 3), (40, 128, 64, 5, 3),
                                  (1, 16, 64, 1, 6), (5, 16, 64, 3, 4), (33, 32, 64, 2, 5), (100, 64, 64, 2, 4),
                                  (16, 16, 128, 3, 6), (128, 128, 128, 2, 4), (70, 64, 64, 1, 4)]:  # fmt: skip
            bn = 128 if n % 128 == 0 and (bm >= 64 or bn == 128) else 64
            cfg = W4Config(bm, bn, sk, 8 if bn == 128 else 4, st, magic=3, swap=True, gluon=True,
                           inflight=2 if bm >= 64 and st == 4 else 1)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            y = w4_matmul(x, pw, cfg)
            ref = x.double() @ w.T
            err = float((y.double() - ref).norm() / ref.norm())
            assert err < 1e-2 and not y.isnan().any(), (n, k, m, cfg, err)
            triton_y = w4_matmul(x, pw, dataclasses.replace(cfg, gluon=False))
            assert float((y.double() - triton_y.double()).norm() / ref.norm()) < 4e-3, (n, k, m, cfg)
        for m, bm, sk, st in [(64, 64, 1, 4), (128, 64, 2, 4), (40, 64, 4, 3)] if n % 256 == 0 else []:
            cfg = W4Config(bm, 256, sk, 16, st, magic=3, swap=True, gluon=True, inflight=2)  # four warp groups
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            y = w4_matmul(x, pw, cfg)
            ref = x.double() @ w.T
            assert float((y.double() - ref).norm() / ref.norm()) < 1e-2 and not y.isnan().any(), (n, k, m, cfg)
        for m in (1, 2, 8, 17, 32, 64, 100, 128):  # the engine's choices (launch_for with the Gluon kernel)
            cfg = launch_for(m, n, k, gluon=True)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            y = w4_matmul(x, pw, cfg)
            ref = x.double() @ w.T
            assert float((y.double() - ref).norm() / ref.norm()) < 1e-2 and not y.isnan().any(), (n, k, m, cfg)


def test_launch_rule_with_the_gluon_kernel() -> None:
    """Pure: the Gluon kernel takes every shape; its tiles divide N, cover M in at most two row tiles,
    and its K splits leave each split at least two 128-k chunks."""
    from engine.int4_launch import fits, plain

    for n, k in [(960, 576), (32064, 3072), (6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096), (576, 576), (1536, 576)]:
        for m in range(1, 129):
            cfg = launch_for(m, n, k, gluon=True)
            assert fits(cfg, n), (m, n, cfg)
            assert cfg.gluon and cfg.stages >= 3, (m, k, cfg)
            assert cfg.swap and cfg.magic == 3 and -(-m // cfg.block_m) <= 2 and 1 <= cfg.split_k <= max(1, k // 256)
            assert cfg.block_n >= 16 * cfg.warps, (m, n, cfg)  # no warp group duplicating another's rows
            assert launch_for(m, n, k, gluon=False).gluon is False
            if cfg.ws:  # the warp-specialized kernel: 128+ rows of x or wide tiles, one warp group per 64 weight rows
                assert m > 32 and cfg.block_n in (128, 256) and cfg.warps == 8 and n % cfg.block_n == 0, (m, n, cfg)
                fallback = plain(cfg)  # where TMA cannot run: the plain kernel's 128-wide tile
                assert not fallback.ws and fallback.block_n == 128 and fallback.stages >= 4
    # measured choices (docs/benchmarks.md): gate/up and the head, qkv and down at 128 rows warp-specialized, o not
    assert all(launch_for(128, n, k, gluon=True).ws for n, k in [(28672, 4096), (128256, 4096), (6144, 4096), (4096, 14336)])
    assert not launch_for(128, 4096, 4096, gluon=True).ws and not launch_for(64, 4096, 14336, gluon=True).ws
    assert not launch_for(128, 960, 576, gluon=True).ws and fits(launch_for(128, 960, 576, gluon=True), 960)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="runs on Hopper (wgmma)")
def test_the_switch_turns_the_gluon_kernel_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """`MESHLLM_GLUON=0` (Gluon is Triton's experimental API): the Triton kernels take its shapes."""
    from engine.int4_triton import gluon_ok

    x = torch.zeros(1, 128, device="cuda", dtype=torch.bfloat16)
    s = torch.ones(64, 4, device="cuda", dtype=torch.bfloat16)
    w = pack_int4(torch.zeros(64, 128, device="cuda", dtype=torch.uint8), s, s)
    assert gluon_ok(x, w)
    monkeypatch.setenv("MESHLLM_GLUON", "0")
    assert not gluon_ok(x, w)
