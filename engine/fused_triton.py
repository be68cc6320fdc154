"""The Triton kernels behind engine/fused.py (imported only on CUDA, or under Triton's interpreter)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.pdl import launch_options, pdl_prologue


@triton.jit
def _add_rms_norm_kernel(H, D, W, HO, XO, n, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    h = tl.load(H + row * n + cols, mask=ok, other=0.0)
    d = tl.load(D + row * n + cols, mask=ok, other=0.0)
    s = (h + d).to(HO.dtype.element_ty)  # the residual stream keeps its dtype, as torch's add would
    tl.store(HO + row * n + cols, s, mask=ok)
    sf = s.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(sf * sf, 0) / n + eps)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(XO + row * n + cols, (sf * inv * w).to(XO.dtype.element_ty), mask=ok)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    n = h.shape[-1]
    rows = h.numel() // n
    h_out, x_out = torch.empty_like(h), torch.empty_like(h)
    _add_rms_norm_kernel[(rows,)](h, delta, weight, h_out, x_out, n, eps, BLOCK=triton.next_power_of_2(n), num_warps=8,
                                   **launch_options(h.device))
    return h_out, x_out


@triton.jit
def _act_mul_kernel(G, U, OUT, n, s_g, s_u, GELU: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    g = tl.load(G + row * s_g + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + row * s_u + cols, mask=ok, other=0.0).to(tl.float32)
    if GELU:  # tanh approximation, as F.gelu(approximate="tanh")
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))
    else:
        a = g / (1.0 + tl.exp(-g))
    tl.store(OUT + row * n + cols, (a * u).to(OUT.dtype.element_ty), mask=ok)


def act_mul(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    n = gate.shape[-1]
    g2, u2 = gate.reshape(-1, n), up.reshape(-1, n)  # views of the gate_up output's two halves
    if g2.stride(1) != 1 or u2.stride(1) != 1:
        g2, u2 = g2.contiguous(), u2.contiguous()
    out = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    block = 1024
    _act_mul_kernel[(g2.shape[0], triton.cdiv(n, block))](
        g2, u2, out, n, g2.stride(0), u2.stride(0), GELU=act == "gelu_tanh", BLOCK=block, num_warps=4,
        **launch_options(gate.device),
    )
    return out
