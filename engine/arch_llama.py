"""The Llama-family block (llama, mistral, qwen2): pre-norm GQA attention, SwiGLU FFN.

Every weight matmul is a `Linear` (engine/linear.py: quantized or dense) on a field of `LlamaLayer`; the attention itself (RoPE,
KV cache, masks, scale) is the `attend` callback that `ShardModel` passes in, so a block knows no cache layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.fused import add_rms_norm, gate_up_act
from engine.linear import Linear, LinearFactory
from shard.config import ModelConfig
from shard.loader import LayerWeights

# attend(q [B, H, T, D], k [B, Hkv, T, D], v [B, Hkv, T, D]) -> o [B, H, T, D]; q and k arrive before
# RoPE: the caller applies it with its position tables (on CUDA decode, fused with the cache write)
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(slots=True)
class LlamaLayer:
    attn_norm: torch.Tensor  # [hidden]
    qkv: Linear  # -> q [.., q], k [.., kv], v [.., kv]: one kernel call (per-op overhead on CPU)
    wo: Linear  # [.., q] -> [.., hidden]
    ffn_norm: torch.Tensor  # [hidden]
    gate_up: Linear  # -> gate, up [.., ffn]
    down: Linear  # [.., ffn] -> [.., hidden]


def make_layer(lw: LayerWeights, lin: LinearFactory) -> LlamaLayer:
    return LlamaLayer(
        attn_norm=lin.vector(lw.attn_norm),
        qkv=lin([lw.wq, lw.wk, lw.wv], [lw.bq, lw.bk, lw.bv]),
        wo=lin([lw.wo]),
        ffn_norm=lin.vector(lw.ffn_norm),
        gate_up=lin([lw.w_gate, lw.w_up]),
        down=lin([lw.w_down]),
    )


def block(
    c: ModelConfig, layer: LlamaLayer, h: torch.Tensor, attend: Attend, delta: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, delta) [B, T, hidden] -> (h, delta) of the next layer: the residual stream is h + delta.

    The block's last residual add is left to the next block, which fuses it with its first RMSNorm
    (one kernel fewer per layer on CUDA; the same ops, so the same bits, on CPU): `delta` None means
    h is already the stream, and the caller adds the last layer's delta once, after the loop."""
    b, t, _ = h.shape
    if delta is None:
        x = rms_norm(h, layer.attn_norm, c.rms_eps)
    else:
        h, x = add_rms_norm(h, delta, layer.attn_norm, c.rms_eps)
    q, k, v = layer.qkv(x)  # [B, T, q], [B, T, kv] x 2
    q = q.view(b, t, c.n_heads, c.head_dim).transpose(1, 2)  # q: [B, H, T, D]
    k = k.view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)  # k: [B, Hkv, T, D]
    v = v.view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)  # v: [B, Hkv, T, D]
    o = attend(q, k, v)  # o: [B, H, T, D]
    h, x = add_rms_norm(h, layer.wo(o.transpose(1, 2).reshape(b, t, c.q_size))[0], layer.ffn_norm, c.rms_eps)
    return h, layer.down(gate_up_act(layer.gate_up, x, "silu"))[0]  # [B, T, ffn] -> [B, T, hidden]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)  # accumulates in fp32 for half inputs


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x * cos + rotated(x) * sin with tables from `torch_model.rope_table` of the same layout.

    rotate_half (HF, llama.cpp's NEOX) pairs x[i] with x[i + D/2]; interleaved (llama.cpp's NORM,
    which the converter permuted llama's Q/K rows for) pairs x[2i] with x[2i + 1]."""
    if interleaved:
        rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    else:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
