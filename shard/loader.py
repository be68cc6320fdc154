"""Loads the tensors of one layer range from a GGUF, as stored: the engine decides their form.

`gguf.GGUFReader` memory-maps the file, so only the pages of the wanted tensors are read, and a
linear weight is a `RawTensor` over its quantized bytes in the map (no copy). Norm vectors and biases
become float32 tensors. Checkpoint quirks are handled once: llama.cpp's Q/K row permutation is kept
and matched by adjacent-pair RoPE (`ModelConfig.rope_interleaved`), so no weight is rewritten, and a
tied model's last stage takes token_embd as its head. Gemma 3 adds per-head q/k norms and
post-attention / post-FFN norms; its converter already stored the norm weights as (1 + w), so every
norm is a plain RMSNorm here, as in llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from shard.config import ModelConfig
from shard.gguf_index import TensorInfo, open_index
from shard.gguf_tensor import RawTensor, TensorTypeError, raw_tensor
from shard.spec import ShardSpec


class ShardLoadError(ValueError):
    """The GGUF lacks a tensor the shard needs, a tensor has an unexpected shape, or a type the
    engine cannot run; the message names the tensor."""


@dataclass(slots=True)
class LayerWeights:
    """One transformer block; linear weights are [out_features, in_features] as in torch."""

    attn_norm: torch.Tensor
    wq: RawTensor
    wk: RawTensor
    wv: RawTensor
    wo: RawTensor
    ffn_norm: torch.Tensor
    w_gate: RawTensor
    w_up: RawTensor
    w_down: RawTensor
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # Gemma 3: RMSNorm of each head's q / k [head_dim]
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None  # Gemma 3: RMSNorm of the attention / FFN output [hidden]
    post_ffn_norm: torch.Tensor | None = None


@dataclass(slots=True)
class ShardWeights:
    config: ModelConfig
    spec: ShardSpec
    layers: list[LayerWeights]
    tok_embd: RawTensor | None  # [vocab, hidden], first stage only
    output_norm: torch.Tensor | None  # [hidden], last stage only
    output: RawTensor | None  # [vocab, hidden], last stage only (token_embd when tied)
    rope_freqs: torch.Tensor | None  # Llama-3 per-dimension frequency factors [head_dim / 2]


def default_dtype(device: str | torch.device) -> torch.dtype:
    """fp32 on CPU (fast kernels, exact parity); bf16 on CUDA when supported, else fp16."""
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def read_model_config(path: str | Path) -> ModelConfig:
    return open_index(path).model_config()


def load_shard(path: str | Path, spec: ShardSpec) -> ShardWeights:
    """The tensors of `spec`'s layer range (plus embedding / head at the ends), as stored."""
    index = open_index(path)
    config = index.model_config()
    if config.n_layers != spec.n_layers:
        raise ShardLoadError(f"spec says {spec.n_layers} layers, GGUF has {config.n_layers}")
    tensors = index.tensors

    def tensor(name: str) -> TensorInfo:
        t = tensors.get(name)
        if t is None:
            raise ShardLoadError(f"GGUF lacks tensor {name}")
        return t

    def matrix(name: str, rows: int, cols: int) -> RawTensor:
        t = tensor(name)
        if t.shape != (cols, rows):  # gguf lists the fastest dimension first
            raise ShardLoadError(f"{name}: shape {list(reversed(t.shape))}, expected [{rows}, {cols}]")
        try:
            return raw_tensor(t, index.data(t), rows, cols)
        except TensorTypeError as e:
            raise ShardLoadError(str(e)) from None

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = tensor(name)
        n = int(np.prod(shape))
        try:
            block, type_bytes = gguf.GGML_QUANT_SIZES[t.qtype]
            if t.n_elements != n or n % block:
                raise ValueError(f"{t.n_elements} values")
            raw = index.data(t).reshape(1, n // block * type_bytes)
            arr = np.asarray(gguf.quants.dequantize(raw, t.qtype), dtype=np.float32).reshape(shape)
        except (NotImplementedError, ValueError, KeyError) as e:
            raise ShardLoadError(f"{name}: type {t.type_name}, expected {shape} ({e})") from None
        if not np.isfinite(arr).all():
            raise ShardLoadError(f"{name}: values are not finite (a corrupt file?)")
        return torch.from_numpy(arr.copy())  # F32 tensors come back as views of the read-only map

    def optional(name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        return get(name, shape) if name in tensors else None

    c = config
    h = c.hidden_size
    layers = []
    for i in range(spec.start, spec.end):
        p = f"blk.{i}."
        gemma3_norms = {}
        if c.is_gemma3:
            gemma3_norms = {
                "q_norm": get(p + "attn_q_norm.weight", (c.head_dim,)),
                "k_norm": get(p + "attn_k_norm.weight", (c.head_dim,)),
                "post_attn_norm": get(p + "post_attention_norm.weight", (h,)),
                "post_ffn_norm": get(p + "post_ffw_norm.weight", (h,)),
            }
        layers.append(
            LayerWeights(
                attn_norm=get(p + "attn_norm.weight", (h,)),
                wq=matrix(p + "attn_q.weight", c.q_size, h),
                wk=matrix(p + "attn_k.weight", c.kv_size, h),
                wv=matrix(p + "attn_v.weight", c.kv_size, h),
                wo=matrix(p + "attn_output.weight", h, c.q_size),
                ffn_norm=get(p + "ffn_norm.weight", (h,)),
                w_gate=matrix(p + "ffn_gate.weight", c.ffn_size, h),
                w_up=matrix(p + "ffn_up.weight", c.ffn_size, h),
                w_down=matrix(p + "ffn_down.weight", h, c.ffn_size),
                bq=optional(p + "attn_q.bias", (c.q_size,)),
                bk=optional(p + "attn_k.bias", (c.kv_size,)),
                bv=optional(p + "attn_v.bias", (c.kv_size,)),
                **gemma3_norms,
            )
        )
    tok_embd = matrix("token_embd.weight", c.vocab_size, h) if spec.is_first else None
    output_norm = output = None
    if spec.is_last:
        output_norm = get("output_norm.weight", (h,))
        if not c.tied_embeddings:
            output = matrix("output.weight", c.vocab_size, h)
        else:
            output = tok_embd if tok_embd is not None else matrix("token_embd.weight", c.vocab_size, h)
    return ShardWeights(
        config=config,
        spec=spec,
        layers=layers,
        tok_embd=tok_embd,
        output_norm=output_norm,
        output=output,
        rope_freqs=optional("rope_freqs.weight", (c.head_dim // 2,)),
    )
