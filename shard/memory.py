"""Memory a shard needs: its weights in the form it holds them, plus the KV cache of its sessions.

Placement, adverts and the node's budget all use this one estimate. The weight figures come from the
GGUF's tensor table (`shard.footprint.weight_bytes`), so a quantized shard is counted at what it
really holds, not at a dequantized size. Pure arithmetic here: no numpy, no gguf.
"""

from __future__ import annotations

from dataclasses import dataclass

from shard.config import ModelConfig
from shard.spec import ShardSpec


@dataclass(frozen=True, slots=True)
class WeightBytes:
    """Bytes of each piece of a model in one weights form on one device."""

    layers: tuple[int, ...]  # one entry per transformer block
    embed: int  # token embedding (first stage)
    head: int  # output norm + head matrix (last stage); a tied head's matrix is the embedding's
    head_shares_embed: bool  # a whole model holds a tied embedding once, for lookups and the head

    def __post_init__(self) -> None:
        if not self.layers or min(self.layers) < 0 or self.embed < 0 or self.head < 0:
            raise ValueError("byte figures must be non-negative, with at least one layer")
        if self.head_shares_embed and self.head < self.embed:
            raise ValueError("a head that shares the embedding holds at least its bytes")

    def shard_bytes(self, spec: ShardSpec) -> int:
        if spec.n_layers != len(self.layers):
            raise ValueError(f"{spec} does not fit a model of {len(self.layers)} layers")
        total = sum(self.layers[spec.start : spec.end])
        if spec.is_first:
            total += self.embed
        if spec.is_last:
            total += self.head
            if spec.is_first and self.head_shares_embed:
                total -= self.embed  # the head's matrix is the embedding, held once
        return total


@dataclass(frozen=True, slots=True)
class ShardMemory:
    weights_bytes: int
    kv_bytes: int
    other_bytes: int  # RoPE tables and per-step buffers (logits), small next to the rest

    @property
    def total(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.other_bytes


def kv_bytes_per_token_per_layer(config: ModelConfig, kv_dtype_bytes: int) -> int:
    return 2 * config.kv_size * kv_dtype_bytes  # k and v


# A node's --kv-sessions N sizes the paged KV pool for N full-context sessions; the torch engine admits
# this many times N sessions, which share the pool's blocks (most sessions are far shorter than the context).
SESSIONS_PER_CONTEXT = 4
# positions one engine step adds at most (the torch engine's prefill chunk), by device type: a
# sliding-window layer's cache holds the window plus one such step per session (window_pool_tokens)
PREFILL_CHUNK = {"cpu": 128, "cuda": 512}


def window_pool_tokens(window: int, sessions: int, context: int, chunk: int, block_size: int, full_pool: int) -> int:
    """Positions the KV pool of sliding-window layers holds: per session the window and one step of
    `chunk` positions, in whole blocks plus one a step may straddle; never more than the full pool."""
    per = (-(-min(context, window + chunk) // block_size) + 1) * block_size
    return min(full_pool, sessions * per)


def estimate_shard_bytes(
    config: ModelConfig,
    spec: ShardSpec,
    weights: WeightBytes,
    *,
    kv_dtype_bytes: int,
    context_tokens: int,
    n_sessions: int,
    window_tokens: int | None = None,
) -> ShardMemory:
    """Weights as held, a KV cache of `n_sessions` x `context_tokens` in `kv_dtype_bytes` (sliding-window
    layers: `window_tokens` in all, from `window_pool_tokens`, when given), and buffers."""
    if kv_dtype_bytes < 1 or context_tokens < 1 or n_sessions < 1:
        raise ValueError("kv_dtype_bytes, context_tokens and n_sessions must be >= 1")
    # k and v: [n_sessions, n_kv_heads, context, head_dim] per layer
    full = n_sessions * context_tokens
    sliding = sum(config.is_sliding(i) for i in range(spec.start, spec.end)) if window_tokens is not None else 0
    tokens = (spec.n_stage_layers - sliding) * full + sliding * min(full, window_tokens or 0)
    kv = tokens * kv_bytes_per_token_per_layer(config, kv_dtype_bytes)
    rope = 2 * 2 * context_tokens * config.head_dim * 4  # cos and sin, two RoPE bases at most
    logits = n_sessions * config.vocab_size * 4 if spec.is_last else 0
    return ShardMemory(weights_bytes=weights.shard_bytes(spec), kv_bytes=kv, other_bytes=rope + logits)
