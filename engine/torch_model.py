"""A layer range in plain torch with a slotted KV cache; the block of each architecture is in its own
module (engine/arch_llama.py: llama, mistral, qwen2; engine/arch_gemma3.py), chosen by the config.

gpt-fast style: the KV cache is preallocated per layer as [slots, kv_heads, max_context, head_dim]
and written at each token's position. A slot holds one session (one request), so several sessions
are in flight at once; `decode` runs one new token of each of several sessions (each at its own
position) in a single forward, which is what lets throughput grow with concurrent streams.

The first stage takes token ids, later stages take hidden states; the last stage returns logits.
Positions are host-side ints (the caller's bookkeeping), so the step loop never reads the device.
Sliding-window layers (Gemma 3) mask keys at or beyond `sliding_window` positions behind the query
and use their own RoPE table; their cache still reserves `max_context` per slot.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine import arch_gemma3, arch_llama
from engine.arch_llama import rms_norm
from engine.linear import LinearFactory
from shard.config import ModelConfig
from shard.loader import ShardWeights
from shard.spec import ShardSpec

LastOutput = Literal["last", "all", "hidden"]
# architecture -> module with make_layer(LayerWeights) and block(config, layer, h, cos, sin, attend)
_ARCH_MODULES = {"gemma3": arch_gemma3}


class ShardModel:
    """Layers `[spec.start, spec.end)` with a KV cache of `max_sessions` slots x `max_context` tokens."""

    def __init__(
        self,
        weights: ShardWeights,
        linears: LinearFactory,
        *,
        max_sessions: int = 8,
        max_context: int = 2048,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        c = weights.config
        if max_sessions < 1 or not 1 <= max_context <= c.context_length:
            raise ValueError(f"need max_sessions >= 1 and 1 <= max_context <= {c.context_length}")
        self.config: ModelConfig = c
        self.spec: ShardSpec = weights.spec
        self.max_sessions = max_sessions
        self.max_context = max_context
        self.device, self.dtype = linears.device, linears.dtype  # activations
        self.embedding = linears.embedding(weights.tok_embd) if weights.tok_embd is not None else None
        self.output_norm = linears.vector(weights.output_norm) if weights.output_norm is not None else None
        tied = weights.output is not None and weights.output is weights.tok_embd  # a whole tied model
        self.output = None
        if weights.output is not None:
            self.output = linears.head(weights.output, self.embedding if tied else None)
        self._arch = _ARCH_MODULES.get(c.architecture, arch_llama)
        self.layers: list[Any] = [self._arch.make_layer(lw, linears) for lw in weights.layers]
        weights.layers = []  # drop the loader's references now rather than when the caller lets go
        # 16-bit KV by default: fp16 on CPU (llama.cpp's cache type), the activation dtype on CUDA.
        # CPU SDPA is ~7x slower in 16-bit, so attention reads the slot's keys upcast to fp32.
        self.kv_dtype = kv_dtype or (torch.float16 if self.device.type == "cpu" else self.dtype)
        cache_shape = (max_sessions, c.n_kv_heads, max_context, c.head_dim)
        # CPU attention reads only positions a session has written (per-session decode, prefill up to
        # its end), so the cache can start unwritten: its pages become resident as sessions grow, as
        # paged KV would. CUDA's batched decode reads masked keys past a session (0 x garbage = NaN).
        new = torch.empty if self.device.type == "cpu" else torch.zeros
        self.k_cache = [new(cache_shape, device=self.device, dtype=self.kv_dtype) for _ in self.layers]
        self.v_cache = [new(cache_shape, device=self.device, dtype=self.kv_dtype) for _ in self.layers]
        self.sliding = [c.is_sliding(i) for i in range(self.spec.start, self.spec.end)]  # per local layer
        self.window = c.sliding_window
        # RoPE tables [max_context, head_dim]: global layers, and sliding ones (own base, no scaling)
        il = c.rope_interleaved
        self.cos, self.sin = rope_table(
            c.rope_base, c.rope_dim, max_context, c.rope_scale, weights.rope_freqs, self.device, self.dtype,
            interleaved=il,
        )
        self.cos_swa, self.sin_swa = self.cos, self.sin
        if any(self.sliding):
            self.cos_swa, self.sin_swa = rope_table(
                c.rope_base_swa, c.rope_dim, max_context, 1.0, None, self.device, self.dtype, interleaved=il
            )

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
        cos_swa, sin_swa = self.cos_swa[pos][None, None], self.sin_swa[pos][None, None]
        keys_full = self._prefill_keys(start_pos, pos, 0)  # (first key, mask [1, 1, T, keys] | None)
        keys_swa = self._prefill_keys(start_pos, pos, self.window) if any(self.sliding) else keys_full
        scale = self.config.attn_scale
        for i, layer in enumerate(self.layers):
            kc, vc = self.k_cache[i], self.v_cache[i]
            lo, mask = keys_swa if self.sliding[i] else keys_full

            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                kc[slot, :, start_pos:end] = k[0]  # noqa: B023 - called within this iteration
                vc[slot, :, start_pos:end] = v[0]  # noqa: B023
                # contiguous copies: CPU SDPA with enable_gqa is ~10x slower on strided views
                keys = kc[slot : slot + 1, :, lo:end].to(q.dtype).contiguous()  # noqa: B023 - [1, Hkv, end - lo, D]
                values = vc[slot : slot + 1, :, lo:end].to(q.dtype).contiguous()  # noqa: B023
                return F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=mask, is_causal=mask is None and t > 1,  # noqa: B023
                    scale=scale, enable_gqa=True,
                )

            rope = (cos_swa, sin_swa) if self.sliding[i] else (cos, sin)
            h = self._arch.block(self.config, layer, h, *rope, attend)
        return self._finish(h[0], last)

    def _prefill_keys(self, start_pos: int, pos: torch.Tensor, window: int) -> tuple[int, torch.Tensor | None]:
        """The cached keys that queries at `pos` ([T], from start_pos) attend to: the first one, and a
        bool mask [1, 1, T, end - first] (None: one query that sees them all, or plain causal from 0).
        With a sliding window, query p sees keys k with p - window < k <= p."""
        t, end = pos.shape[0], start_pos + pos.shape[0]
        if not window or end <= window:  # no query reaches past the window
            if start_pos == 0 or t == 1:
                return 0, None
            keys = torch.arange(end, device=self.device)
            return 0, (keys[None, :] <= pos[:, None])[None, None]  # query i sees keys 0..start_pos + i
        lo = max(0, start_pos - window + 1)  # the oldest key the first query still sees
        if t == 1:
            return lo, None
        age = pos[:, None] - torch.arange(lo, end, device=self.device)[None, :]  # [T, end - lo]
        return lo, ((age >= 0) & (age < window))[None, None]

    def _decode(self, slots: list[int], x: torch.Tensor, positions: list[int]) -> torch.Tensor:
        b = len(slots)
        if b != len(positions) or b != x.shape[0]:
            raise ValueError("slots, positions and x must have the same length")
        if b == 1 and self.device.type != "cpu":
            # views of the cache, no gather. On CPU a lone session takes the batched path too, so a
            # session's step is the same computation alone or in a batch: ggml's 8-bit activations
            # turn the last-bit differences of two attention kernels into different tokens.
            return self._prefill(slots[0], x, positions[0], "last")
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
        h = self._embed(x).unsqueeze(1)  # [B, 1, hidden]
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]  # [B, 1, 1, D]
        cos_swa, sin_swa = self.cos_swa[pos][:, None, None], self.sin_swa[pos][:, None, None]
        per_session = self.device.type == "cpu"  # CPU attends per session (_attend_each): no gather, no mask
        if not per_session:
            keys_at = torch.arange(n_keys, device=self.device)
            read_rows = (heads[:, :, None] * self.max_context + keys_at).flatten()  # [B * Hkv * n_keys]
            # additive mask [B, 1, 1, n_keys]: 0 where key <= the session's position, -inf past it
            mask = torch.zeros(b, 1, 1, n_keys, device=self.device, dtype=self.dtype)
            mask.masked_fill_((keys_at[None, :] > pos[:, None])[:, None, None], float("-inf"))
            mask_swa = mask
            if any(self.sliding) and max(positions) >= self.window:  # and keys window or more behind
                too_old = (pos[:, None] - keys_at[None, :] >= self.window)[:, None, None]
                mask_swa = mask.masked_fill(too_old, float("-inf"))
        scale = c.attn_scale
        rep = c.n_heads // c.n_kv_heads
        gathered = (b, c.n_kv_heads, n_keys, c.head_dim)
        for i, layer in enumerate(self.layers):
            kc, vc = self.k_cache[i].view(-1, c.head_dim), self.v_cache[i].view(-1, c.head_dim)

            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                # k, v: [B, Hkv, 1, D], written at (slot_b, :, pos_b)
                kc.index_copy_(0, write_rows, k.reshape(-1, c.head_dim).to(kc.dtype))  # noqa: B023
                vc.index_copy_(0, write_rows, v.reshape(-1, c.head_dim).to(vc.dtype))  # noqa: B023
                if per_session:
                    return self._attend_each(i, slots, positions, q)  # noqa: B023
                keys = kc.index_select(0, read_rows).view(gathered).to(q.dtype)  # noqa: B023 - [B, Hkv, n_keys, D]
                values = vc.index_select(0, read_rows).view(gathered).to(q.dtype)  # noqa: B023
                # one query per head: fold each KV group's query heads into the query axis, which
                # needs no GQA support from the kernel (CUDA's masked GQA falls back to math)
                o = F.scaled_dot_product_attention(
                    q.reshape(b, c.n_kv_heads, rep, c.head_dim), keys, values,
                    attn_mask=mask_swa if self.sliding[i] else mask, scale=scale,  # noqa: B023
                )  # o: [B, Hkv, rep, D]
                return o.reshape(b, c.n_heads, 1, c.head_dim)

            rope = (cos_swa, sin_swa) if self.sliding[i] else (cos, sin)
            h = self._arch.block(c, layer, h, *rope, attend)
        return self._finish(h[:, 0], "all")

    def _attend_each(self, layer: int, slots: list[int], positions: list[int], q: torch.Tensor) -> torch.Tensor:
        """CPU decode attention, one session at a time over exactly its own keys (q: [B, H, 1, D]).

        A padded, masked batch gives the same values up to the last bit, and ggml's 8-bit activations
        turn such bits into different tokens; alone and batched must agree, since concurrent requests
        must not change each other's output. On CPU this costs ~50 us per session and layer, next to
        matmuls that cost the same per session batched or not."""
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        window = self.window if self.sliding[layer] else 0
        out = []
        for b, (slot, p) in enumerate(zip(slots, positions, strict=True)):
            lo = max(0, p - window + 1) if window else 0
            keys = kc[slot : slot + 1, :, lo : p + 1].to(q.dtype).contiguous()  # [1, Hkv, keys, D]
            values = vc[slot : slot + 1, :, lo : p + 1].to(q.dtype).contiguous()
            out.append(F.scaled_dot_product_attention(
                q[b : b + 1], keys, values, scale=self.config.attn_scale, enable_gqa=True
            ))  # fmt: skip
        return torch.cat(out)  # [B, H, 1, D]

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
            assert self.embedding is not None  # the first stage has one
            h = self.embedding(x).to(self.device, self.dtype)
            scale = self.config.embed_scale  # Gemma: sqrt(hidden)
            return h if scale == 1.0 else h * scale
        if x.dim() != 2 or x.shape[1] != self.config.hidden_size:
            raise ValueError(f"stage {self.spec} takes hidden states [T, {self.config.hidden_size}]")
        return x.to(self.device, self.dtype)

    def _finish(self, h: torch.Tensor, last: LastOutput) -> torch.Tensor:
        """h: [N, hidden] -> hidden (middle stages), or normed hidden / float32 logits (last stage)."""
        if not self.spec.is_last:
            return h
        if last == "last":
            h = h[-1:]
        assert self.output_norm is not None and self.output is not None  # the last stage has them
        h = rms_norm(h, self.output_norm, self.config.rms_eps)
        if last == "hidden":
            return h
        return self.output(h)[0].float()


def _attention_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """On CUDA, keep SDPA off cuDNN: it builds a graph per key length (~1.4 ms of host time at each
    decode step, as the cache grows by one); flash / memory-efficient kernels take any length."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def rope_table(
    base: float,
    dim: int,
    n_pos: int,
    scale: float,
    freq_factors: torch.Tensor | None,
    device: torch.device,
    dtype: torch.dtype,
    *,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n_pos, dim] for `arch_llama.rope`: each angle twice, as halves (rotate_half) or
    adjacent pairs (interleaved); `scale` divides positions (linear scaling)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if freq_factors is not None:  # Llama 3.x long-context scaling, as llama.cpp applies it
        inv_freq = inv_freq / freq_factors.double().cpu()
    positions = torch.arange(n_pos, dtype=torch.float64)
    if scale != 1.0:
        positions = positions / scale
    angles = torch.outer(positions, inv_freq)  # [n_pos, D / 2]
    emb = angles.repeat_interleave(2, dim=-1) if interleaved else torch.cat([angles, angles], dim=-1)  # [n_pos, D]
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)
