"""The Llama-family block (llama, mistral, qwen2): pre-norm GQA attention, SwiGLU FFN.

Every weight matmul is an `F.linear` on a field of `LlamaLayer`; the attention itself (KV cache,
masks, scale) is the `attend` callback that `ShardModel` passes in, so a block knows no cache layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shard.config import ModelConfig
from shard.loader import LayerWeights

# attend(q [B, H, T, D], k [B, Hkv, T, D], v [B, Hkv, T, D]) -> o [B, H, T, D]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(slots=True)
class LlamaLayer:
    attn_norm: torch.Tensor  # [hidden]
    wqkv: torch.Tensor  # [q + 2 kv, hidden]: one matmul instead of three (per-op overhead on CPU)
    bqkv: torch.Tensor | None
    wo: torch.Tensor  # [hidden, q]
    ffn_norm: torch.Tensor  # [hidden]
    w_gate_up: torch.Tensor  # [2 ffn, hidden]
    w_down: torch.Tensor  # [hidden, ffn]


def make_layer(lw: LayerWeights) -> LlamaLayer:
    bqkv = None
    if lw.bq is not None and lw.bk is not None and lw.bv is not None:
        bqkv = torch.cat([lw.bq, lw.bk, lw.bv])
    return LlamaLayer(
        attn_norm=lw.attn_norm,
        wqkv=torch.cat([lw.wq, lw.wk, lw.wv]),
        bqkv=bqkv,
        wo=lw.wo,
        ffn_norm=lw.ffn_norm,
        w_gate_up=torch.cat([lw.w_gate, lw.w_up]),
        w_down=lw.w_down,
    )


def block(
    c: ModelConfig, layer: LlamaLayer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend
) -> torch.Tensor:
    """h: [B, T, hidden] -> [B, T, hidden]."""
    b, t, _ = h.shape
    x = rms_norm(h, layer.attn_norm, c.rms_eps)
    qkv = F.linear(x, layer.wqkv, layer.bqkv)  # [B, T, q + 2 kv]
    q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
    q = q.view(b, t, c.n_heads, c.head_dim).transpose(1, 2)  # q: [B, H, T, D]
    k = k.view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)  # k: [B, Hkv, T, D]
    v = v.view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)  # v: [B, Hkv, T, D]
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    o = attend(q, k, v)  # o: [B, H, T, D]
    h = h + F.linear(o.transpose(1, 2).reshape(b, t, c.q_size), layer.wo)
    x = rms_norm(h, layer.ffn_norm, c.rms_eps)
    gate, up = F.linear(x, layer.w_gate_up).chunk(2, dim=-1)  # [B, T, ffn] each
    return h + F.linear(F.silu(gate) * up, layer.w_down)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)  # accumulates in fp32 for half inputs


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF rotate_half RoPE (llama.cpp's NEOX); llama's Q/K rows were unpermuted by the loader."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
