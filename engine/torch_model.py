"""A layer range in plain torch over a paged KV cache; the block of each architecture is in its own
module (engine/arch_llama.py: llama, mistral, qwen2; engine/arch_gemma3.py), chosen by the config.

K and V live in fixed-size blocks (engine/kv_cache.py) that sessions take as they grow; a "slot" is a
session's row of the block table. `prefill` runs new positions of one session (a prompt, or a chunk
of one); `decode` runs one new token of each of several sessions, each at its own position, in one
forward, which is what lets throughput grow with concurrent streams.

On CUDA a decode step has static shapes: positions, slots and block numbers are device tensors, and
attention reads keys where they lie through the block table (engine/paged_attention.py), so the
step is captured once per batch-size bucket in a CUDA graph and replayed (engine/decode_graphs.py).
On CPU the same step runs eagerly, attention one session at a time over exactly its own keys: ggml's
8-bit activations turn the last-bit differences of a padded, masked batch into different tokens, and
concurrent requests must not change each other's output.

The first stage takes token ids, later stages take hidden states; the last stage returns logits.
Sliding-window layers (Gemma 3) skip keys `sliding_window` or more positions behind the query and use
their own RoPE table; their cache keeps only the window and the step in flight (engine/kv_cache.py).
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine import arch_gemma3, arch_llama
from engine.arch_llama import rms_norm, rope
from engine.decode_graphs import DecodeGraphs
from engine.kv_cache import PagedKVCache, blocks_for
from engine.linear import LinearFactory
from engine.paged_attention import (
    HostKeys,
    decode_attention_dense,
    decode_attention_host,
    host_keys,
    triton_supported,
)
from shard.config import ModelConfig
from shard.loader import ShardWeights
from shard.memory import PREFILL_CHUNK, window_pool_tokens
from shard.spec import ShardSpec

LastOutput = Literal["last", "all", "hidden", "none"]  # "none": fill the cache only
# architecture -> module with make_layer(LayerWeights) and block(config, layer, h, attend, delta) -> (h, delta)
_ARCH_MODULES = {"gemma3": arch_gemma3}
_BLOCK_SIZE = 32  # positions per KV block: tl.dot needs >= 16; larger wastes more of a last block


class ShardModel:
    """Layers `[spec.start, spec.end)` with a paged KV cache: `max_sessions` sessions of up to
    `max_context` positions each, sharing a pool of `kv_tokens` positions (default: enough for all
    sessions at full length)."""

    def __init__(
        self,
        weights: ShardWeights,
        linears: LinearFactory,
        *,
        max_sessions: int = 8,
        max_context: int = 2048,
        kv_dtype: torch.dtype | None = None,
        kv_tokens: int | None = None,
        block_size: int | None = None,
        cuda_graphs: bool = True,
        window_step: int | None = None,
    ) -> None:
        """`window_step`: the most positions one step adds (the engine's prefill chunk); it sizes the
        sliding-window layers' own KV pool (default: the device's prefill chunk)."""
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
        # CPU SDPA is ~7x slower in 16-bit, so attention reads a session's keys upcast to fp32.
        self.kv_dtype = kv_dtype or (torch.float16 if self.device.type == "cpu" else self.dtype)
        bs = block_size or _BLOCK_SIZE
        self.sliding = [c.is_sliding(i) for i in range(self.spec.start, self.spec.end)]  # per local layer
        self.window = c.sliding_window
        pool = kv_tokens or max_sessions * blocks_for(max_context, bs) * bs
        step = window_step or PREFILL_CHUNK["cpu" if self.device.type == "cpu" else "cuda"]
        self.kv = PagedKVCache(
            len(self.layers), c.n_kv_heads, c.head_dim, max_sessions=max_sessions, max_context=max_context,
            pool_tokens=pool, block_size=bs, device=self.device, dtype=self.kv_dtype, window=self.window,
            window_layers=self.sliding, window_step=step,
            window_pool_tokens=window_pool_tokens(self.window, max_sessions, max_context, step, bs, pool),
        )
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
        on_cuda = self.device.type == "cuda"
        self._triton = on_cuda and triton_supported(c.head_dim, c.n_heads, c.n_kv_heads)
        # the Triton kernels (paged decode; RoPE + cache write), imported only where they run
        self._kernels = importlib.import_module("engine.paged_attention_triton") if self._triton else None
        self.graphs: DecodeGraphs | None = None
        if on_cuda and cuda_graphs:
            self.graphs = DecodeGraphs(self._decode_on_device, max_sessions, c.hidden_size, self.device, self.dtype)

    # -- public steps -------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(
        self, slot: int, x: torch.Tensor, start_pos: int, *, last: LastOutput = "last"
    ) -> torch.Tensor:
        """Runs T new positions `[start_pos, start_pos + T)` of the session in `slot`.

        x: token ids [T] on the first stage, hidden states [T, hidden] otherwise.
        Returns hidden [T, hidden] on non-last stages; on the last stage logits [1, vocab] for
        `last="last"`, [T, vocab] for "all", or the final-normed hidden [T, hidden] for "hidden".
        Raises KVCacheFull when the pool has no block for the new positions.
        """
        t = x.shape[0]
        if not 0 <= slot < self.max_sessions or t < 1 or start_pos < 0 or start_pos + t > self.max_context:
            raise ValueError(f"slot {slot} positions [{start_pos}, {start_pos + t}) out of range")
        self.kv.ensure(slot, start_pos + t, start_pos)
        with _attention_backends(self.device):
            return self._prefill(slot, x, start_pos, last)

    @torch.inference_mode()
    def decode(self, slots: list[int], x: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """One new token for each of B sessions: session b is in `slots[b]`, its token at `positions[b]`.

        x: token ids [B] on the first stage, hidden states [B, hidden] otherwise.
        Returns hidden [B, hidden], or logits [B, vocab] on the last stage.
        """
        b = len(slots)
        if b != len(positions) or b != x.shape[0] or b == 0:
            raise ValueError("slots, positions and x must have the same, non-zero length")
        if len(set(slots)) != b or not all(0 <= s < self.max_sessions for s in slots):
            raise ValueError(f"bad slots {slots}")
        if min(positions) < 0 or max(positions) >= self.max_context:
            raise ValueError(f"positions {positions} out of range")
        for s, p in zip(slots, positions, strict=True):
            self.kv.ensure(s, p + 1)
        h = self._embed(x)  # [B, hidden]; host-side embedding rows on CUDA, so outside any graph
        if self.device.type == "cpu":
            return self._decode_on_host(h, slots, positions)
        self.kv.sync_table()
        idx = torch.tensor([positions, slots], dtype=torch.int64).pin_memory()  # one copy in
        if self.graphs is not None:
            return self.graphs.run(h, idx, self.kv.pad_slot)
        with _attention_backends(self.device):
            return self._decode_on_device(h, idx.to(self.device, non_blocking=True))

    def release(self, slot: int) -> None:
        """Returns the session's KV blocks to the pool (its positions are forgotten)."""
        self.kv.release(slot)

    # -- steps ----------------------------------------------------------------------------------

    def _prefill(self, slot: int, x: torch.Tensor, start_pos: int, last: LastOutput) -> torch.Tensor:
        t = x.shape[0]
        end = start_pos + t
        h = self._embed(x).unsqueeze(0)  # [1, T, hidden]
        pos = torch.arange(start_pos, end, device=self.device)
        cos, sin = self.cos[pos][None, None], self.sin[pos][None, None]  # [1, 1, T, D]
        cos_swa, sin_swa = self.cos_swa[pos][None, None], self.sin_swa[pos][None, None]
        keys_full = self._prefill_keys(start_pos, pos, 0)  # (first key, mask [1, 1, T, keys] | None)
        keys_swa = self._prefill_keys(start_pos, pos, self.window) if any(self.sliding) else keys_full
        kinds = (False, True) if self.kv.window else (False,)  # full layers, then window ones (write_index)
        writes = [self.kv.write_index(slot, start_pos, end, window=w).to(self.device) for w in kinds]
        scale, il = self.config.attn_scale, self.config.rope_interleaved
        delta: torch.Tensor | None = None  # the residual add each block leaves to the next (arch_llama.block)
        for i, layer in enumerate(self.layers):
            kc, vc = self.kv.k[i].flatten(0, 1), self.kv.v[i].flatten(0, 1)  # [blocks * size, Hkv, D]
            lo, mask = keys_swa if self.sliding[i] else keys_full
            write = writes[self.kv.is_window(i)]

            r = (cos_swa, sin_swa) if self.sliding[i] else (cos, sin)

            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                q, k = rope(q, *r, il), rope(k, *r, il)  # noqa: B023 - called within this iteration
                kc.index_copy_(0, write, k[0].transpose(0, 1).to(kc.dtype))  # noqa: B023 - this iteration's
                vc.index_copy_(0, write, v[0].transpose(0, 1).to(vc.dtype))  # noqa: B023
                keys, values = self.kv.gather(i, slot, lo, end)  # noqa: B023 - [Hkv, end - lo, D]
                # contiguous copies: CPU SDPA with enable_gqa is ~10x slower on strided views
                return F.scaled_dot_product_attention(
                    q, keys.to(q.dtype).contiguous()[None], values.to(q.dtype).contiguous()[None],
                    attn_mask=mask, is_causal=mask is None and t > 1,  # noqa: B023
                    scale=scale, enable_gqa=True,
                )

            h, delta = self._arch.block(self.config, layer, h, attend, delta)
        return self._finish(_stream(h, delta)[0], last)

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

    def _decode_on_host(self, h: torch.Tensor, slots: list[int], positions: list[int]) -> torch.Tensor:
        """CPU decode: writes and attention from host bookkeeping, each session over its own keys."""
        c = self.config
        writes = [
            torch.cat([self.kv.write_index(s, p, p + 1, window=w) for s, p in zip(slots, positions, strict=True)])
            for w in ((False, True) if self.kv.window else (False,))
        ]
        pos = torch.tensor(positions)
        rope_full = self.cos[pos][:, None, None], self.sin[pos][:, None, None]  # [B, 1, 1, D]
        rope_swa = self.cos_swa[pos][:, None, None], self.sin_swa[pos][:, None, None]
        h = h.unsqueeze(1)  # [B, 1, hidden]
        il = c.rope_interleaved
        delta: torch.Tensor | None = None
        keys: dict[tuple[int, bool], HostKeys] = {}  # (window, window table) -> the rows sessions read
        for i, layer in enumerate(self.layers):
            kc, vc = self.kv.k[i].flatten(0, 1), self.kv.v[i].flatten(0, 1)
            window = self.window if self.sliding[i] else 0
            r = rope_swa if self.sliding[i] else rope_full
            write = writes[self.kv.is_window(i)]
            kind = (window, self.kv.is_window(i))
            if kind not in keys:
                keys[kind] = host_keys(self.kv, slots, positions, window=window, window_table=kind[1])
            ks = keys[kind]

            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                q, k = rope(q, *r, il), rope(k, *r, il)  # noqa: B023
                kc.index_copy_(0, write, k[:, :, 0].to(kc.dtype))  # noqa: B023 - k: [B, Hkv, 1, D]
                vc.index_copy_(0, write, v[:, :, 0].to(vc.dtype))  # noqa: B023
                o = decode_attention_host(
                    q[:, :, 0], self.kv, i, slots, positions, window=window, scale=c.attn_scale, keys=ks  # noqa: B023
                )
                return o[:, :, None]

            h, delta = self._arch.block(c, layer, h, attend, delta)
        return self._finish(_stream(h, delta)[:, 0], "all")

    def _decode_on_device(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """CUDA decode with fixed shapes and no host sync: h [B, hidden], idx [2, B] int64 on the device
        (positions, slots). Captured per batch bucket by DecodeGraphs; padded rows use the pad slot."""
        c, kv = self.config, self.kv
        pos, slots = idx[0], idx[1]
        tables_writes = []  # (block table rows, cache rows written) of the full layers, then the window ones
        for table_dev in (kv.table_dev, kv.table_w_dev) if kv.window else (kv.table_dev,):
            rows = table_dev.index_select(0, slots)  # [B, max_blocks] int32
            block = rows.gather(1, (pos // kv.block_size)[:, None])[:, 0].long()
            tables_writes.append((rows, block * kv.block_size + pos % kv.block_size))  # [B]
        seq_lens = (pos + 1).to(torch.int32)
        il, kernels = c.rope_interleaved, self._kernels
        h = h.unsqueeze(1)
        delta: torch.Tensor | None = None
        for i, layer in enumerate(self.layers):
            kc, vc = kv.k[i], kv.v[i]
            window = self.window if self.sliding[i] else 0
            tables = (self.cos_swa, self.sin_swa) if self.sliding[i] else (self.cos, self.sin)
            table, write = tables_writes[kv.is_window(i)]

            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                if kernels is not None:  # RoPE of q and k and the cache write in one kernel, then attention
                    q1 = kernels.rope_and_cache(q[:, :, 0], k[:, :, 0], v[:, :, 0], *tables, pos, write, kc, vc, il)  # noqa: B023
                    o = kernels.paged_decode(q1, kc, vc, table, seq_lens, window=window, scale=c.attn_scale)  # noqa: B023
                    return o[:, :, None]
                # a head size the kernel does not tile: exact, but reads every block of the table
                cos, sin = (t[pos][:, None, None] for t in tables)  # noqa: B023
                q, k = rope(q, cos, sin, il), rope(k, cos, sin, il)
                kc.flatten(0, 1).index_copy_(0, write, k[:, :, 0].to(kc.dtype))  # noqa: B023
                vc.flatten(0, 1).index_copy_(0, write, v[:, :, 0].to(vc.dtype))  # noqa: B023
                o = decode_attention_dense(q[:, :, 0], kc, vc, table, seq_lens, window=window, scale=c.attn_scale)  # noqa: B023
                return o[:, :, None]

            h, delta = self._arch.block(c, layer, h, attend, delta)
        return self._finish(_stream(h, delta)[:, 0], "all")

    # -- pieces -------------------------------------------------------------------------------

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids [T] (first stage) or hidden states [T, hidden] -> [T, hidden] on the device."""
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
        if last == "none":
            return h[:0]
        if last == "last":
            h = h[-1:]
        assert self.output_norm is not None and self.output is not None  # the last stage has them
        h = rms_norm(h, self.output_norm, self.config.rms_eps)
        if last == "hidden":
            return h
        return self.output(h)[0].float()


def _stream(h: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """The residual stream after the last block: its pending add (see arch_llama.block)."""
    return h if delta is None else h + delta


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
