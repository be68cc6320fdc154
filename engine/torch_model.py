"""A Llama-family layer range in plain torch: RMSNorm, RoPE, GQA, SwiGLU, a slotted KV cache.

gpt-fast style: the KV cache is preallocated per layer as [slots, kv_heads, max_context, head_dim]
and written at each token's position. A slot holds one session (one request), so several sessions
are in flight at once; `decode` runs one new token of each of several sessions (each at its own
position) in a single forward, which is what lets throughput grow with concurrent streams.

The first stage takes token ids, later stages take hidden states; the last stage returns logits.
Positions are host-side ints (the caller's bookkeeping), so the step loop never reads the device.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from shard.config import ModelConfig
from shard.loader import ShardWeights
from shard.spec import ShardSpec

LastOutput = Literal["last", "all", "hidden"]


@dataclass(slots=True)
class _Layer:
    attn_norm: torch.Tensor  # [hidden]
    wqkv: torch.Tensor  # [q + 2 kv, hidden]: one matmul instead of three (per-op overhead on CPU)
    bqkv: torch.Tensor | None
    wo: torch.Tensor  # [hidden, q]
    ffn_norm: torch.Tensor  # [hidden]
    w_gate_up: torch.Tensor  # [2 ffn, hidden]
    w_down: torch.Tensor  # [hidden, ffn]


class ShardModel:
    """Layers `[spec.start, spec.end)` with a KV cache of `max_sessions` slots x `max_context` tokens."""

    def __init__(self, weights: ShardWeights, *, max_sessions: int = 8, max_context: int = 2048) -> None:
        c = weights.config
        if max_sessions < 1 or not 1 <= max_context <= c.context_length:
            raise ValueError(f"need max_sessions >= 1 and 1 <= max_context <= {c.context_length}")
        self.config: ModelConfig = c
        self.spec: ShardSpec = weights.spec
        self.max_sessions = max_sessions
        self.max_context = max_context
        self.tok_embd = weights.tok_embd
        self.output_norm = weights.output_norm
        self.output = weights.output
        ref = weights.layers[0].wq
        self.device, self.dtype = ref.device, ref.dtype
        self.layers: list[_Layer] = []
        for lw in weights.layers:
            bqkv = None
            if lw.bq is not None and lw.bk is not None and lw.bv is not None:
                bqkv = torch.cat([lw.bq, lw.bk, lw.bv])
            self.layers.append(
                _Layer(
                    attn_norm=lw.attn_norm,
                    wqkv=torch.cat([lw.wq, lw.wk, lw.wv]),
                    bqkv=bqkv,
                    wo=lw.wo,
                    ffn_norm=lw.ffn_norm,
                    w_gate_up=torch.cat([lw.w_gate, lw.w_up]),
                    w_down=lw.w_down,
                )
            )
        weights.layers = []  # drop the unfused copies now rather than when the caller lets go
        cache_shape = (max_sessions, c.n_kv_heads, max_context, c.head_dim)
        self.k_cache = [torch.zeros(cache_shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(cache_shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.cos, self.sin = _rope_tables(c, max_context, weights.rope_freqs, self.device, self.dtype)

    # -- public steps -------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(
        self, slot: int, x: torch.Tensor, start_pos: int, *, last: LastOutput = "last"
    ) -> torch.Tensor:
        """Runs T new positions `[start_pos, start_pos + T)` of the session in `slot`.

        x: token ids [T] on the first stage, hidden states [T, hidden] otherwise.
        Returns hidden [T, hidden] on non-last stages; on the last stage logits [1, vocab] for
        `last="last"`, [T, vocab] for "all", or the final-normed hidden [T, hidden] for "hidden".
        """
        with _attention_backends(self.device):
            return self._prefill(slot, x, start_pos, last)

    @torch.inference_mode()
    def decode(self, slots: list[int], x: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """One new token for each of B sessions: session b is in `slots[b]`, its token at `positions[b]`.

        x: token ids [B] on the first stage, hidden states [B, hidden] otherwise.
        Returns hidden [B, hidden], or logits [B, vocab] on the last stage.
        """
        with _attention_backends(self.device):
            return self._decode(slots, x, positions)

    def _prefill(self, slot: int, x: torch.Tensor, start_pos: int, last: LastOutput) -> torch.Tensor:
        t = x.shape[0]
        end = start_pos + t
        if not 0 <= slot < self.max_sessions or t < 1 or start_pos < 0 or end > self.max_context:
            raise ValueError(f"slot {slot} positions [{start_pos}, {end}) out of range")
        h = self._embed(x).unsqueeze(0)  # [1, T, hidden]
        pos = torch.arange(start_pos, end, device=self.device)
        cos, sin = self.cos[pos][None, None], self.sin[pos][None, None]  # [1, 1, T, D]
        if start_pos == 0 or t == 1:
            mask = None  # plain causal, or one query that sees every cached key
        else:
            # query i (at start_pos + i) sees keys 0..start_pos + i
            keys = torch.arange(end, device=self.device)
            mask = (keys[None, :] <= pos[:, None])[None, None]  # [1, 1, T, end]
        for i, layer in enumerate(self.layers):
            kc, vc = self.k_cache[i], self.v_cache[i]

            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                kc[slot, :, start_pos:end] = k[0]  # noqa: B023 - called within this iteration
                vc[slot, :, start_pos:end] = v[0]  # noqa: B023
                # contiguous copies: CPU SDPA with enable_gqa is ~10x slower on strided views
                keys = kc[slot : slot + 1, :, :end].contiguous()  # noqa: B023 - [1, Hkv, end, D]
                values = vc[slot : slot + 1, :, :end].contiguous()  # noqa: B023
                return F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=mask, is_causal=mask is None and t > 1, enable_gqa=True
                )

            h = self._block(layer, h, cos, sin, attend)
        return self._finish(h[0], last)

    def _decode(self, slots: list[int], x: torch.Tensor, positions: list[int]) -> torch.Tensor:
        b = len(slots)
        if b != len(positions) or b != x.shape[0]:
            raise ValueError("slots, positions and x must have the same length")
        if b == 1:
            return self._prefill(slots[0], x, positions[0], "last")  # views of the cache, no gather
        if len(set(slots)) != b or not all(0 <= s < self.max_sessions for s in slots):
            raise ValueError(f"bad slots {slots}")
        if min(positions) < 0 or max(positions) >= self.max_context:
            raise ValueError(f"positions {positions} out of range")
        c = self.config
        n_keys = max(positions) + 1  # attend over the longest session; shorter ones are masked
        pos = torch.tensor(positions, device=self.device)
        # Row indices into a layer's cache seen as [slots * Hkv * max_context, D], computed once per
        # step, so each layer writes and gathers with one index_copy_ / index_select kernel.
        heads = torch.tensor(slots, device=self.device)[:, None] * c.n_kv_heads + torch.arange(
            c.n_kv_heads, device=self.device
        )  # [B, Hkv]
        write_rows = (heads * self.max_context + pos[:, None]).flatten()  # [B * Hkv]
        keys_at = torch.arange(n_keys, device=self.device)
        read_rows = (heads[:, :, None] * self.max_context + keys_at).flatten()  # [B * Hkv * n_keys]
        h = self._embed(x).unsqueeze(1)  # [B, 1, hidden]
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]  # [B, 1, 1, D]
        # additive mask [B, 1, 1, n_keys]: 0 where key <= the session's position, -inf past it
        mask = torch.zeros(b, 1, 1, n_keys, device=self.device, dtype=self.dtype)
        mask.masked_fill_((keys_at[None, :] > pos[:, None])[:, None, None], float("-inf"))
        rep = c.n_heads // c.n_kv_heads
        gathered = (b, c.n_kv_heads, n_keys, c.head_dim)
        for i, layer in enumerate(self.layers):
            kc, vc = self.k_cache[i].view(-1, c.head_dim), self.v_cache[i].view(-1, c.head_dim)

            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                # k, v: [B, Hkv, 1, D], written at (slot_b, :, pos_b)
                kc.index_copy_(0, write_rows, k.reshape(-1, c.head_dim))  # noqa: B023
                vc.index_copy_(0, write_rows, v.reshape(-1, c.head_dim))  # noqa: B023
                keys = kc.index_select(0, read_rows).view(gathered)  # noqa: B023 - [B, Hkv, n_keys, D]
                values = vc.index_select(0, read_rows).view(gathered)  # noqa: B023
                # one query per head: fold each KV group's query heads into the query axis, which
                # needs no GQA support from the kernel (CUDA's masked GQA falls back to math)
                o = F.scaled_dot_product_attention(
                    q.reshape(b, c.n_kv_heads, rep, c.head_dim), keys, values, attn_mask=mask
                )  # o: [B, Hkv, rep, D]
                return o.reshape(b, c.n_heads, 1, c.head_dim)

            h = self._block(layer, h, cos, sin, attend)
        return self._finish(h[:, 0], "all")

    def clear_slot(self, slot: int) -> None:
        """Zeroes a slot's cache; not needed for correctness (positions beyond a session are masked)."""
        for kc, vc in zip(self.k_cache, self.v_cache, strict=True):
            kc[slot].zero_()
            vc[slot].zero_()

    # -- pieces -------------------------------------------------------------------------------

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.is_first:
            if x.dtype not in (torch.int32, torch.int64) or x.dim() != 1:
                raise ValueError("the first stage takes token ids [T]")
            return F.embedding(x.to(self.device), self.tok_embd)  # type: ignore[arg-type]
        if x.dim() != 2 or x.shape[1] != self.config.hidden_size:
            raise ValueError(f"stage {self.spec} takes hidden states [T, {self.config.hidden_size}]")
        return x.to(self.device, self.dtype)

    def _block(self, layer: _Layer, h: torch.Tensor, cos, sin, attend) -> torch.Tensor:  # noqa: ANN001
        c = self.config
        b, t, _ = h.shape
        x = _rms_norm(h, layer.attn_norm, c.rms_eps)
        qkv = F.linear(x, layer.wqkv, layer.bqkv)  # [B, T, q + 2 kv]
        q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = q.view(b, t, c.n_heads, c.head_dim).transpose(1, 2)  # q: [B, H, T, D]
        k = k.view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)  # k: [B, Hkv, T, D]
        v = v.view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)  # v: [B, Hkv, T, D]
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        o = attend(q, k, v)  # o: [B, H, T, D]
        h = h + F.linear(o.transpose(1, 2).reshape(b, t, c.q_size), layer.wo)
        x = _rms_norm(h, layer.ffn_norm, c.rms_eps)
        gate, up = F.linear(x, layer.w_gate_up).chunk(2, dim=-1)  # [B, T, ffn] each
        return h + F.linear(F.silu(gate) * up, layer.w_down)

    def _finish(self, h: torch.Tensor, last: LastOutput) -> torch.Tensor:
        """h: [N, hidden] -> hidden (middle stages), or normed hidden / float32 logits (last stage)."""
        if not self.spec.is_last:
            return h
        if last == "last":
            h = h[-1:]
        h = _rms_norm(h, self.output_norm, self.config.rms_eps)  # type: ignore[arg-type]
        if last == "hidden":
            return h
        return F.linear(h, self.output).float()  # type: ignore[arg-type]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)  # accumulates in fp32 for half inputs


def _attention_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """On CUDA, keep SDPA off cuDNN: it builds a graph per key length (~1.4 ms of host time at each
    decode step, as the cache grows by one); flash / memory-efficient kernels take any length."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF rotate_half RoPE; valid because the loader undid llama.cpp's interleaved Q/K layout."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _rope_tables(
    c: ModelConfig, n_pos: int, freq_factors: torch.Tensor | None, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (c.rope_base ** (torch.arange(0, c.rope_dim, 2, dtype=torch.float64) / c.rope_dim))
    if freq_factors is not None:  # Llama 3.x long-context scaling, as llama.cpp applies it
        inv_freq = inv_freq / freq_factors.double().cpu()
    angles = torch.outer(torch.arange(n_pos, dtype=torch.float64), inv_freq)  # [n_pos, D / 2]
    emb = torch.cat([angles, angles], dim=-1)  # [n_pos, D]
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)
