"""engine/gemv_triton.py (batch-1 bf16 decode on CUDA) against torch, under Triton's interpreter on CPU
(fp16: the interpreter computes through numpy, which has no bfloat16)."""

import interpreted_checks
import pytest
import torch

pytest.importorskip("triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU CI's check; on CUDA the compiled kernel is tested below "
                    "(Triton 3.6's interpreter cannot walk a loop bounded by tensors)")
def test_the_gemv_and_its_fused_activations_match_torch(pytestconfig) -> None:
    """interpreted_checks.GEMV_CHECK, run in the background from the first engine test."""
    out = interpreted_checks.result(pytestconfig, "gemv")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (compiled, bf16, PDL on where the GPU has it)")
def test_the_compiled_gemv_matches_torch_on_cuda() -> None:
    """The compiled kernel (first tile loaded before the PDL wait) on fresh random bf16 data, against
    float64, for Llama-3-8B's shapes and odd ones."""
    import torch.nn.functional as F

    from engine.gemv_triton import gemv

    g = torch.Generator(device="cuda").manual_seed(3)
    for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (96, 576), (4104, 96), (40, 1536)]:
        x = torch.randn(k, device="cuda", dtype=torch.bfloat16, generator=g)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.05
        ref = w.double() @ x.double()
        y = gemv(x, w).double()
        assert float((y - ref).norm() / ref.norm()) < 1e-2
        f = n // 2
        act = F.silu(ref[:f]) * ref[f:]
        y = gemv(x, w, "silu").double()
        assert float((y - act).norm() / act.norm()) < 2e-2
