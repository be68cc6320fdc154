"""The Triton kernel behind `paged_attention.decode_attention_cuda` (imported only on CUDA machines).

Program (b, g, s): session b, KV head g, split s. It loads the REP query heads that share KV head g
(padded to 16 rows for tl.dot), walks the blocks [s * PER, (s + 1) * PER) that hold keys of the
session (inside the sliding window when there is one) with an online softmax, and writes the
split's running max, sum and weighted values. `paged_decode` merges the splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.paged_attention import splits_for

_NEG = -1.0e30  # finite: an empty split merges with weight exp(-1e30 - m) = 0, never NaN


@triton.jit
def _split_kernel(
    Q, K, V, TABLE, LENS, ACC, M, L,
    scale, window,
    s_qb, s_qh,
    s_kb, s_kp, s_kh,
    s_tb,
    s_ab, s_ah, s_as,
    s_mb, s_mh,
    REP: tl.constexpr, REP_P: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, PER: tl.constexpr,
):
    b = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(LENS + b)
    lo = 0
    if window > 0:
        lo = tl.maximum(seq_len - window, 0)
    first = tl.maximum(s * PER, lo // BS)
    stop = tl.minimum((s + 1) * PER, tl.cdiv(seq_len, BS))

    r = tl.arange(0, REP_P)
    d = tl.arange(0, D)
    n = tl.arange(0, BS)
    heads = g * REP + r
    q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=(r < REP)[:, None], other=0.0)
    m_i = tl.full([REP_P], _NEG, tl.float32)
    l_i = tl.zeros([REP_P], tl.float32)
    acc = tl.zeros([REP_P, D], tl.float32)
    for j in range(first, stop):
        block = tl.load(TABLE + b * s_tb + j).to(tl.int64)
        offs = block * s_kb + n[:, None] * s_kp + g * s_kh + d[None, :]
        k = tl.load(K + offs).to(q.dtype)  # [BS, D]
        v = tl.load(V + offs).to(q.dtype)
        pos = j * BS + n
        valid = (pos < seq_len) & (pos >= lo)
        # positions past the session's end hold whatever an earlier owner of the block left there:
        # zero them, since a weight of 0 times a stale NaN is still NaN
        k = tl.where(valid[:, None], k, 0.0)
        v = tl.where(valid[:, None], v, 0.0)
        scores = tl.dot(q, tl.trans(k)) * scale  # [REP_P, BS], fp32
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
        m_i = m_new
    keep = r < REP
    tl.store(ACC + b * s_ab + heads[:, None] * s_ah + s * s_as + d[None, :], acc, mask=keep[:, None])
    tl.store(M + b * s_mb + heads * s_mh + s, m_i, mask=keep)
    tl.store(L + b * s_mb + heads * s_mh + s, l_i, mask=keep)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    window: int,
    scale: float,
) -> torch.Tensor:
    b, h, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    rep = h // hkv
    per, splits = splits_for(table.shape[1])
    q = q.contiguous()
    acc = torch.empty(b, h, splits, d, device=q.device, dtype=torch.float32)
    m = torch.empty(b, h, splits, device=q.device, dtype=torch.float32)
    lsum = torch.empty_like(m)
    _split_kernel[(b, hkv, splits)](
        q, k_cache, v_cache, table, seq_lens, acc, m, lsum,
        scale, window,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        table.stride(0),
        acc.stride(0), acc.stride(1), acc.stride(2),
        m.stride(0), m.stride(1),
        REP=rep, REP_P=max(16, triton.next_power_of_2(rep)), D=d, BS=bs, PER=per,
        num_warps=4, num_stages=2,
    )
    w = torch.exp(m - m.amax(-1, keepdim=True))  # [B, H, S]
    out = (acc * w[..., None]).sum(2) / (lsum * w).sum(-1)[..., None]
    return out.to(q.dtype)
