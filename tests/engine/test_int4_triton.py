"""The Triton W4A16 kernels (engine/int4_triton.py) against a float reference, under Triton's interpreter.

CI has no GPU, so the kernels run on CPU with TRITON_INTERPRET=1 (fp16 activations: the interpreter
computes through numpy, which has no bfloat16). The H200 runs the same checks in test_torch_cuda.py's
company: scripts/bench_int4_gemm.py compares every winner with tinygemm on the same weights.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from engine.int4_triton import GROUP, W4Config, W4Weight, fits, launch_for, pack_int4  # noqa: E402
from shard.gguf_tensor import int4_dequantize, to_int4_groups  # noqa: E402
from tests.engine.test_linear import make_raw  # noqa: E402


def unpack(w: W4Weight) -> torch.Tensor:
    """float32 [N, K] from the packed layout, in torch: an independent reading of `pack_int4`'s docstring."""
    n, kp = w.qw.shape[0], w.qw.shape[1] * 8
    words = w.qw.view(n, kp // 128, 16)  # [N, chunk, r]
    # [N, chunk, j, r]: k = 128 c + 16 j + r; j = 2 g at bits 4 g, j = 2 g + 1 at bits 4 g + 16
    nib = torch.stack([(words >> (4 * (j // 2) + 16 * (j % 2))) & 0xF for j in range(8)], 2)
    q = nib.reshape(n, kp).float() - 8
    g = torch.arange(kp) // GROUP
    return (q * w.scales.float().T[:, g] + w.zeros.float().T[:, g])[:, : w.in_features]


@pytest.mark.parametrize("k", [256, 576, 4096])  # 576: SmolLM2's hidden size, padded to 640
def test_packing_round_trips(k: int) -> None:
    n = 48
    g = torch.Generator().manual_seed(k)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    s, z = torch.rand(n, k // 32, generator=g), torch.randn(n, k // 32, generator=g)
    w = pack_int4(q, s, z)
    assert w.qw.shape == (n, -(-k // 128) * 16) and w.qw.dtype == torch.int32
    ref = (q.float() - 8) * s.repeat_interleave(32, 1) + z.repeat_interleave(32, 1)
    torch.testing.assert_close(unpack(w), ref)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K"])
def test_gguf_groups_become_scale_and_min(type_name: str) -> None:
    """TritonInt4Linear's conversion of GGUF blocks: the same weights, up to bf16 scales and zeros."""
    from engine.linear import TritonInt4Linear

    raw = make_raw(type_name, 64, 512)
    lin = TritonInt4Linear.from_groups([to_int4_groups(raw)], [64], None, torch.device("cpu"))
    ref = torch.from_numpy(int4_dequantize(to_int4_groups(raw)))
    err = float((unpack(lin.w) - ref).norm() / ref.norm())
    assert err < 2.5e-3, err  # bf16 scale and zero, as tinygemm's: 1.6-1.8e-3 (docs/torch-engine.md)


def test_every_batch_size_gets_a_launch_shape_that_tiles_the_weight() -> None:
    for n in (576, 960, 1536, 3072, 4096, 6144, 28672, 49152, 262144):
        for m in range(1, 140):
            cfg = launch_for(m, n)
            assert fits(cfg, n) and (cfg.block_m == 0) == (m == 1), (m, n, cfg)


_KERNEL_CHECK = r"""
import torch
from engine.int4_triton import W4Config, pack_int4, w4_matmul
torch.manual_seed(0)
worst = 0.0
for n, k in [(64, 256), (32, 576)]:
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    s, z = (torch.rand(n, k // 32) * 0.1).half(), (torch.randn(n, k // 32) * 0.1).half()
    w = ((q.float().view(n, -1, 32) - 8) * s.float()[..., None] + z.float()[..., None]).view(n, k)
    pw = pack_int4(q, s, z)
    for m, cfg in [
        (1, W4Config(0, 32, 1, 4, 2)), (1, W4Config(0, 16, 3, 4, 2, magic=0)), (1, W4Config(0, 16, 2, 4, 2, magic=3)),
        (3, W4Config(16, 32, 1, 4, 2)), (20, W4Config(16, 32, 2, 4, 2, magic=0)),
        (5, W4Config(16, 32, 3, 4, 2, swap=True)), (1, W4Config(16, 32, 1, 4, 2, swap=True)),
        (33, W4Config(32, 32, 2, 4, 2, swap=True)),
        # K splits summed by the last program of each tile (per-weight counters): row, dot and swapped
        (1, W4Config(0, 16, 3, 4, 2, magic=3, fixup=True)), (6, W4Config(16, 32, 3, 4, 2, fixup=True)),
        (7, W4Config(16, 32, 2, 4, 2, swap=True, fixup=True)),
        # the PTX paths asked for with fp16: the one-row kernel falls back to 3, the others to 1
        (1, W4Config(0, 32, 2, 4, 2, magic=4)), (4, W4Config(16, 32, 2, 4, 2, magic=3, swap=True)),
    ]:
        x = torch.randn(m, k).half()
        y = w4_matmul(x, pw, cfg)
        assert y.shape == (m, n) and y.dtype == torch.float16, (y.shape, y.dtype, cfg)
        ref = x.float() @ w.T
        worst = max(worst, float((y.float() - ref).norm() / ref.norm()))
        assert int(pw.counters.abs().sum()) == 0, cfg  # every counter back at 0 for the next call
print("worst", worst)
assert worst < 2e-3, worst
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU CI's check; on CUDA the compiled kernels are tested below "
                    "(Triton 3.6's interpreter cannot walk a loop bounded by tensors)")
def test_the_triton_int4_kernels_match_a_float_reference() -> None:
    """Row (GEMV), tensor-core and swapped kernels; split-K 1-3 (uneven splits), K padded (576), M
    past one tile, the int -> float paths, the row kernel's factored scale (magic 3), and K splits
    summed by their last program or by a second kernel. (The PTX path, magic 3 of the tensor-core kernels, runs only on CUDA:
    test_torch_cuda.py.)"""
    out = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "worst" in out.stdout


def test_a_launch_shape_that_does_not_tile_is_refused() -> None:
    from engine.int4_triton import w4_matmul

    w = pack_int4(torch.zeros(48, 128, dtype=torch.uint8), torch.ones(48, 4), torch.zeros(48, 4))
    with pytest.raises(ValueError, match="does not fit"):
        w4_matmul(torch.zeros(1, 128), w, W4Config(0, 32, 1, 4, 2))
    with pytest.raises(ValueError, match="does not fit"):
        w4_matmul(torch.zeros(1, 64), w, W4Config(0, 16, 1, 4, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (the PTX dequantizing path and PDL)")
def test_every_int4_path_matches_a_float_reference_on_cuda() -> None:
    """bf16 on the GPU: each kernel with each int -> float path (3 is PTX there), K splits summed by
    their last program or by a second kernel, and launch_for's choices at 1-128 rows, against float64
    on fresh random codes, scales and zeros."""
    from engine.int4_triton import w4_matmul

    g = torch.Generator(device="cuda").manual_seed(7)
    for n, k in [(256, 4096), (192, 576)]:
        q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.uint8, generator=g)
        s = (torch.rand(n, k // 32, device="cuda", generator=g) * 0.02).bfloat16()
        z = (torch.randn(n, k // 32, device="cuda", generator=g) * 0.02).bfloat16()
        w = ((q.double().view(n, -1, 32) - 8) * s.double()[..., None] + z.double()[..., None]).view(n, k)
        pw = pack_int4(q, s, z)
        cfgs = [(1, W4Config(0, 32, 2, 4, 3, magic=m)) for m in (0, 1, 3, 4)]
        cfgs += [(m, W4Config(16, 64, 2, 4, 2, magic=mg, swap=sw, fixup=f))
                 for m in (3, 16) for mg in (1, 2, 3) for sw in (False, True) for f in (False, True)]
        cfgs += [(m, launch_for(m, n)) for m in (1, 2, 8, 17, 32, 64, 128)]
        for m, cfg in cfgs:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            y = w4_matmul(x, pw, cfg)
            ref = x.double() @ w.T
            err = float((y.double() - ref).norm() / ref.norm())
            assert err < 1e-2 and not y.isnan().any(), (n, k, m, cfg, err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_split_k_sums_are_the_same_bits_every_time_and_in_graphs() -> None:
    """The last-program sum (counters per weight, reset by that program) against the summing kernel:
    the same bits, on every eager call and every replay of a captured graph."""
    import dataclasses

    from engine.int4_triton import w4_matmul

    g = torch.Generator(device="cuda").manual_seed(11)
    n, k = 4096, 4096
    q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.uint8, generator=g)
    s = (torch.rand(n, k // 32, device="cuda", generator=g) * 0.02).bfloat16()
    pw = pack_int4(q, s, torch.zeros_like(s))
    for m in (1, 8, 32):
        cfg = dataclasses.replace(launch_for(m, n), fixup=True)
        assert cfg.split_k > 1
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
        ref = w4_matmul(x, pw, dataclasses.replace(cfg, fixup=False))
        for _ in range(5):
            assert torch.equal(w4_matmul(x, pw, cfg), ref)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = w4_matmul(x, pw, cfg)
        for _ in range(5):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, ref)
        assert int(pw.counters.abs().sum()) == 0  # every tile's counter back at 0
