"""Decode attention over the paged KV cache: one query token per session, keys found by block table.

CUDA: a Triton split-K ("flash decoding") kernel (engine/paged_attention_triton.py, `paged_decode`). Its grid is (sessions, kv heads, splits); each
program walks only the blocks of its split that hold the session's keys, for all the query heads of
one KV head (GQA), and a few torch ops merge the splits. Lengths and block numbers are read from
device tensors, so the launch has fixed shapes and replays from a CUDA graph as sessions grow.
There is no per-step gather of K/V: each key is read once, where it lies.

CPU: one scaled_dot_product_attention per session over exactly its own keys (the batch-invariance
reason is in ShardModel's docstring). Both take the same inputs, so tests compare them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.kv_cache import PagedKVCache

_TARGET_SPLITS = 16  # enough programs to fill a GPU at batch 1; more only adds merge work


def splits_for(max_blocks: int) -> tuple[int, int]:
    """(blocks per split, number of splits) for a table of `max_blocks` columns."""
    per = max(1, -(-max_blocks // _TARGET_SPLITS))
    return per, -(-max_blocks // per)


def triton_supported(head_dim: int, n_heads: int, n_kv_heads: int) -> bool:
    """The kernel's tiles need a power-of-two head size of 16..256 and at most 16 query heads per KV head."""
    rep = n_heads // n_kv_heads
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0 and 1 <= rep <= 16


@dataclass(frozen=True, slots=True)
class HostKeys:
    """The keys each session of a CPU decode step reads: `rows` [sum of lens] index a layer's cache
    seen as [n_blocks * block_size, kv_heads, head_dim], session b's `lens[b]` rows after those before."""

    rows: torch.Tensor  # int64
    lens: list[int]


def host_keys(kv: PagedKVCache, slots: list[int], positions: list[int], *, window: int, window_table: bool) -> HostKeys:
    """Session b in slots[b] attends to its keys [max(0, p - window + 1), p] (p = positions[b]), found
    in the window layers' table or the full one. The same for every layer of a kind: once a step."""
    spans = [(max(0, p - window + 1) if window else 0, p + 1) for p in positions]
    rows = [kv.write_index(s, lo, end, window=window_table) for s, (lo, end) in zip(slots, spans, strict=True)]
    return HostKeys(torch.cat(rows), [end - lo for lo, end in spans])


def decode_attention_host(
    q: torch.Tensor,
    kv: PagedKVCache,
    layer: int,
    slots: list[int],
    positions: list[int],
    *,
    window: int,
    scale: float,
    keys: HostKeys | None = None,
) -> torch.Tensor:
    """The same attention with host bookkeeping: q [B, H, D] -> [B, H, D]; session b in slots[b]
    attends to its keys [max(0, p - window + 1), p] (p = positions[b]); `keys`: from `host_keys`.

    Every session's keys are gathered and widened to q's dtype in one op for K and one for V (the
    per-session ops were most of the attention's cost); each session's SDPA then reads a view of
    exactly its own keys, which gives the bits of a lone session's contiguous keys."""
    if keys is None:
        keys = host_keys(kv, slots, positions, window=window, window_table=kv.is_window(layer))
    kv_all = []
    for cache in (kv.k[layer], kv.v[layer]):
        rows = cache.flatten(0, 1).index_select(0, keys.rows)  # [sum L, Hkv, D]
        # contiguous [Hkv, sum L, D] in q's dtype: CPU SDPA is far slower in 16-bit and on transposed views
        kv_all.append(rows.transpose(0, 1).to(q.dtype, memory_format=torch.contiguous_format)[None])
    k_each, v_each = (t.split(keys.lens, dim=2) for t in kv_all)  # [1, Hkv, L_b, D] views
    out = [
        F.scaled_dot_product_attention(qb, kb, vb, scale=scale, enable_gqa=True)  # [1, H, 1, D]
        for qb, kb, vb in zip(q[:, :, None].split(1), k_each, v_each, strict=True)
    ]
    return torch.cat(out)[:, :, 0]


def decode_attention_dense(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    window: int,
    scale: float,
) -> torch.Tensor:
    """The Triton `paged_decode`'s contract in plain torch: every session reads all of its table's
    blocks and masks what it does not own. Fixed shapes (graph-safe) but reads max_context keys per
    session: the fallback where the kernel does not apply, and the kernel's reference in tests."""
    b, h, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    rows = table.long()  # [B, max_blocks]
    n = rows.shape[1] * bs
    keys = k_cache[rows].reshape(b, n, hkv, d).transpose(1, 2).to(q.dtype)  # [B, Hkv, n, D]
    values = v_cache[rows].reshape(b, n, hkv, d).transpose(1, 2).to(q.dtype)
    at = torch.arange(n, device=q.device)
    lens = seq_lens.long()[:, None]
    ok = at[None, :] < lens
    if window:
        ok &= at[None, :] >= lens - window
    rep = h // hkv
    # blocks hold stale numbers past a session's end (even NaN from an earlier owner): zero them
    keep = ok[:, None, :, None]
    keys, values = keys.masked_fill(~keep, 0), values.masked_fill(~keep, 0)
    o = F.scaled_dot_product_attention(
        q.reshape(b, hkv, rep, d), keys, values, attn_mask=ok[:, None, None], scale=scale
    )  # [B, Hkv, rep, D]
    return o.reshape(b, h, d)
