"""The Gemma 3 block, as llama.cpp runs it (src/models/gemma3.cpp), and Gemma 3's chat template.

Differences from the Llama block, all here (the hyper-parameters are in `ModelConfig`):
- RMSNorm of each head's q and k (`q_norm`, `k_norm`) before RoPE;
- RMSNorm of the attention output and of the FFN output before each residual add
  (`post_attn_norm`, `post_ffn_norm`); the GGUF stores every norm weight as (1 + w) already;
- GELU (tanh approximation) gating in the FFN instead of SiLU;
- NEOX RoPE (rotate_half; the converter does not permute Gemma's Q/K rows), with base
  `rope_base` on global layers and `rope_base_swa` on sliding ones (chosen by `ShardModel`);
- sliding-window layers (masked by `ShardModel`), embeddings scaled by sqrt(hidden)
  (`ModelConfig.embed_scale`), softmax scale `ModelConfig.attn_scale`, tied head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.arch_llama import Attend, rms_norm
from engine.builtin_templates import GEMMA3_CHAT_TEMPLATE
from engine.fused import add_rms_norm, gate_up_act
from engine.linear import Linear, LinearFactory
from shard.config import ModelConfig
from shard.loader import LayerWeights

CHAT_TEMPLATE = GEMMA3_CHAT_TEMPLATE  # the model's own template, for files that lack one


@dataclass(slots=True)
class Gemma3Layer:
    attn_norm: torch.Tensor  # [hidden]
    qkv: Linear  # -> q [.., q], k [.., kv], v [.., kv]
    q_norm: torch.Tensor  # [head_dim]
    k_norm: torch.Tensor  # [head_dim]
    wo: Linear  # [.., q] -> [.., hidden]
    post_attn_norm: torch.Tensor  # [hidden]
    ffn_norm: torch.Tensor  # [hidden]
    gate_up: Linear  # -> gate, up [.., ffn]
    down: Linear  # [.., ffn] -> [.., hidden]
    post_ffn_norm: torch.Tensor  # [hidden]


def make_layer(lw: LayerWeights, lin: LinearFactory) -> Gemma3Layer:
    if lw.q_norm is None or lw.k_norm is None or lw.post_attn_norm is None or lw.post_ffn_norm is None:
        raise ValueError("a Gemma 3 layer needs q/k norms and post-attention/FFN norms")
    return Gemma3Layer(
        attn_norm=lin.vector(lw.attn_norm),
        qkv=lin([lw.wq, lw.wk, lw.wv]),
        q_norm=lin.vector(lw.q_norm),
        k_norm=lin.vector(lw.k_norm),
        wo=lin([lw.wo]),
        post_attn_norm=lin.vector(lw.post_attn_norm),
        ffn_norm=lin.vector(lw.ffn_norm),
        gate_up=lin([lw.w_gate, lw.w_up]),
        down=lin([lw.w_down]),
        post_ffn_norm=lin.vector(lw.post_ffn_norm),
    )


def block(
    c: ModelConfig, layer: Gemma3Layer, h: torch.Tensor, attend: Attend, delta: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, delta) [B, T, hidden] -> (h, delta) of the next layer, as `arch_llama.block`."""
    b, t, _ = h.shape
    eps = c.rms_eps
    if delta is None:
        x = rms_norm(h, layer.attn_norm, eps)
    else:
        h, x = add_rms_norm(h, delta, layer.attn_norm, eps)
    q, k, v = layer.qkv(x)
    q = rms_norm(q.view(b, t, c.n_heads, c.head_dim), layer.q_norm, eps).transpose(1, 2)  # [B, H, T, D]
    k = rms_norm(k.view(b, t, c.n_kv_heads, c.head_dim), layer.k_norm, eps).transpose(1, 2)  # [B, Hkv, T, D]
    v = v.view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)  # v: [B, Hkv, T, D]
    o = attend(q, k, v)  # o: [B, H, T, D]; RoPE by the caller (NEOX: rope_interleaved is False here)
    (o,) = layer.wo(o.transpose(1, 2).reshape(b, t, c.q_size))
    h, x = add_rms_norm(h, rms_norm(o, layer.post_attn_norm, eps), layer.ffn_norm, eps)
    (y,) = layer.down(gate_up_act(layer.gate_up, x, "gelu_tanh"))
    return h, rms_norm(y, layer.post_ffn_norm, eps)
