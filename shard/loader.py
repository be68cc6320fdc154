"""Loads the tensors of one layer range from a GGUF into torch, dequantized.

`gguf.GGUFReader` memory-maps the file, so only the pages of the wanted tensors are read. Checkpoint
quirks are fixed here, once: llama.cpp's Q/K row permutation is undone so the model can use the
standard HF rotate_half RoPE, and tied embeddings give the last stage a copy of token_embd as head.
Gemma 3 adds per-head q/k norms and post-attention / post-FFN norms; its converter already stored the
norm weights as (1 + w), so every norm is a plain RMSNorm here, as in llama.cpp.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from shard.config import ModelConfig, read_config
from shard.spec import ShardSpec


class ShardLoadError(Exception):
    """The GGUF lacks a tensor the shard needs, or a tensor has an unexpected shape."""


@dataclass(slots=True)
class LayerWeights:
    """One transformer block; linear weights are [out_features, in_features] as in torch."""

    attn_norm: torch.Tensor
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    ffn_norm: torch.Tensor
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
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
    tok_embd: torch.Tensor | None  # [vocab, hidden], first stage only
    output_norm: torch.Tensor | None  # [hidden], last stage only
    output: torch.Tensor | None  # [vocab, hidden], last stage only (token_embd when tied)
    rope_freqs: torch.Tensor | None  # Llama-3 per-dimension frequency factors [head_dim / 2]


def default_dtype(device: str | torch.device) -> torch.dtype:
    """fp32 on CPU (fast kernels, exact parity); bf16 on CUDA when supported, else fp16."""
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def open_reader(path: str | Path) -> gguf.GGUFReader:
    """A memory-mapped reader, shared per file version: parsing the metadata (tokenizer arrays of
    ~100k strings) costs ~3 s in gguf 0.19, far more than dequantizing a shard."""
    stat = Path(path).stat()
    return _cached_reader(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _cached_reader(path: str, size: int, mtime_ns: int) -> gguf.GGUFReader:
    del size, mtime_ns  # part of the cache key only: a rewritten file gets a fresh reader
    return gguf.GGUFReader(path, "r")


def read_model_config(path: str | Path) -> ModelConfig:
    return read_config(open_reader(path))


def load_shard(
    path: str | Path,
    spec: ShardSpec,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> ShardWeights:
    """Dequantizes the tensors of `spec`'s layer range (plus embedding / head at the ends)."""
    reader = open_reader(path)
    config = read_config(reader)
    if config.n_layers != spec.n_layers:
        raise ShardLoadError(f"spec says {spec.n_layers} layers, GGUF has {config.n_layers}")
    tensors = {t.name: t for t in reader.tensors}
    dtype = dtype or default_dtype(device)

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = tensors.get(name)
        if t is None:
            raise ShardLoadError(f"GGUF lacks tensor {name}")
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        if np.may_share_memory(arr, t.data):
            arr = arr.copy()  # F32 tensors come back as views of the read-only memory map
        if tuple(arr.shape) != shape:
            raise ShardLoadError(f"{name}: shape {tuple(arr.shape)}, expected {shape}")
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(device, dtype)

    def optional(name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        return get(name, shape) if name in tensors else None

    c = config
    h = c.hidden_size
    layers = []
    for i in range(spec.start, spec.end):
        p = f"blk.{i}."
        wq, wk = get(p + "attn_q.weight", (c.q_size, h)), get(p + "attn_k.weight", (c.kv_size, h))
        bq, bk = optional(p + "attn_q.bias", (c.q_size,)), optional(p + "attn_k.bias", (c.kv_size,))
        if c.permuted_qk:
            wq, wk = unpermute_rows(wq, c.n_heads), unpermute_rows(wk, c.n_kv_heads)
            bq = unpermute_rows(bq, c.n_heads) if bq is not None else None
            bk = unpermute_rows(bk, c.n_kv_heads) if bk is not None else None
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
                wq=wq,
                wk=wk,
                wv=get(p + "attn_v.weight", (c.kv_size, h)),
                wo=get(p + "attn_output.weight", (h, c.q_size)),
                ffn_norm=get(p + "ffn_norm.weight", (h,)),
                w_gate=get(p + "ffn_gate.weight", (c.ffn_size, h)),
                w_up=get(p + "ffn_up.weight", (c.ffn_size, h)),
                w_down=get(p + "ffn_down.weight", (h, c.ffn_size)),
                bq=bq,
                bk=bk,
                bv=optional(p + "attn_v.bias", (c.kv_size,)),
                **gemma3_norms,
            )
        )
    embd_shape = (c.vocab_size, h)
    tok_embd = get("token_embd.weight", embd_shape) if spec.is_first else None
    output_norm = output = None
    if spec.is_last:
        output_norm = get("output_norm.weight", (h,))
        if not c.tied_embeddings:
            output = get("output.weight", embd_shape)
        else:
            output = tok_embd if tok_embd is not None else get("token_embd.weight", embd_shape)
    return ShardWeights(
        config=config,
        spec=spec,
        layers=layers,
        tok_embd=tok_embd,
        output_norm=output_norm,
        output=output,
        rope_freqs=optional("rope_freqs.weight", (c.head_dim // 2,)),
    )


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverts llama.cpp's convert-time permutation of Q/K rows.

    The converter maps each head's rows from HF's halves layout (x[:d/2], x[d/2:]) to interleaved
    pairs (x[0::2], x[1::2]) for its adjacent-pair RoPE; after this, rotate_half RoPE applies.
    """
    rows = w.shape[0]
    return (
        w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(w.shape)
        .contiguous()
    )
