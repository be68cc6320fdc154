"""Memory a shard needs: dequantized weights plus the KV cache of its sessions. Placement uses it."""

from __future__ import annotations

from dataclasses import dataclass

from shard.config import ModelConfig
from shard.spec import ShardSpec


@dataclass(frozen=True, slots=True)
class ShardMemory:
    weights_bytes: int
    kv_bytes: int
    other_bytes: int  # RoPE tables and per-step buffers (logits), small next to the rest

    @property
    def total(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.other_bytes


def shard_weight_params(config: ModelConfig, spec: ShardSpec) -> int:
    """Parameters the shard holds once loaded (tied embedding counted once on a whole model)."""
    embd = config.vocab_size * config.hidden_size
    params = spec.n_stage_layers * config.layer_params()
    if spec.is_first:
        params += embd
    if spec.is_last:
        params += config.hidden_size  # output norm
        if not (config.tied_embeddings and spec.is_first):
            params += embd  # head (a separate copy of token_embd on a tied last stage)
    return params


def estimate_shard_bytes(
    config: ModelConfig,
    spec: ShardSpec,
    dtype_bytes: int,
    context_tokens: int,
    n_sessions: int,
) -> ShardMemory:
    """Bytes for weights in `dtype_bytes` per element and a KV cache of `n_sessions` x `context_tokens`."""
    if dtype_bytes < 1 or context_tokens < 1 or n_sessions < 1:
        raise ValueError("dtype_bytes, context_tokens and n_sessions must be >= 1")
    weights = shard_weight_params(config, spec) * dtype_bytes
    # k and v: [n_sessions, n_kv_heads, context, head_dim] per layer
    kv = 2 * spec.n_stage_layers * n_sessions * context_tokens * config.kv_size * dtype_bytes
    rope = 2 * context_tokens * config.head_dim * dtype_bytes
    logits = n_sessions * config.vocab_size * 4 if spec.is_last else 0
    return ShardMemory(weights_bytes=weights, kv_bytes=kv, other_bytes=rope + logits)
