"""Elementwise pairs the blocks run, fused into one kernel on CUDA (Triton) and plain torch elsewhere.

In a CUDA-graph decode step of an 8B model each kernel launch still costs 2-3 us on the GPU, and a
layer's matmuls are only four of its kernels: the residual add followed by RMSNorm, and the
activation times the up projection, are two kernels each in torch. On CPU the torch ops stay as they
are (the ggml path's numbers, and the tests that pin them, do not move).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.linear import DenseLinear, Linear

_TRITON: bool | None = None


def _triton_ok(t: torch.Tensor) -> bool:
    global _TRITON
    if t.device.type != "cuda":
        return False
    if _TRITON is None:
        try:
            import engine.fused_triton  # noqa: F401 - triton ships with CUDA torch builds
        except ImportError:
            _TRITON = False
        else:
            _TRITON = True
    return _TRITON


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, rms_norm(h + delta) * weight) over the last dimension."""
    if _triton_ok(h) and h.is_contiguous() and delta.is_contiguous():
        from engine.fused_triton import add_rms_norm as fused

        return fused(h, delta, weight, eps)
    h = h + delta
    return h, F.rms_norm(h, weight.shape, weight, eps)


def gate_up_act(gate_up: Linear, x: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up from the FFN's gate/up linear: one kernel in all for one bf16 row on CUDA
    (engine/gemv_triton.py), the linear then `act_mul` otherwise."""
    if (
        isinstance(gate_up, DenseLinear) and gate_up.bias is None and gate_up.one_row_gemv(x)
        and len(gate_up.out_features) == 2 and gate_up.out_features[0] == gate_up.out_features[1]
    ):  # fmt: skip
        from engine.gemv_triton import gemv

        return gemv(x.reshape(-1).to(gate_up.weight.dtype), gate_up.weight, act).view(*x.shape[:-1], -1)
    gate, up = gate_up(x)
    return act_mul(gate, up, act)


def act_mul(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up, act "silu" (Llama) or "gelu_tanh" (Gemma)."""
    if _triton_ok(gate):
        from engine.fused_triton import act_mul as fused

        return fused(gate, up, act)
    g = F.silu(gate) if act == "silu" else F.gelu(gate, approximate="tanh")
    return g * up
