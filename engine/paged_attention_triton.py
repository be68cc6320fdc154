"""The Triton kernels of CUDA decode (imported only where they run: CUDA, or Triton's interpreter).

- `_split_kernel`, program (b, g, s): session b, KV head g, split s. It loads the REP query heads
  that share KV head g (padded to 16 rows for tl.dot), walks the blocks [s * PER, (s + 1) * PER)
  that hold keys of the session (inside the sliding window when there is one) with an online
  softmax, and writes the split's running max, sum and weighted values.
- `_merge_kernel`, program (b, h): the splits of one query head, merged into its output.
- `_rope_cache_kernel`, program (b, head): RoPE of one q or k head at the session's position, and
  for a k head the write of k and v into the session's cache row.
Each replaces a chain of small torch kernels: a decode step launches per layer about 15 kernels, not
35, which is most of what a replayed CUDA graph still spends outside the matmuls.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.paged_attention import splits_for
from engine.pdl import launch_options, pdl_prologue

_NEG = tl.constexpr(-1.0e30)  # finite: an empty split merges with weight exp(-1e30 - m) = 0, never NaN


@triton.jit
def _split_kernel(
    Q, K, V, TABLE, LENS, ACC, M, L,
    scale, window,
    s_qb, s_qh,
    s_kb, s_kp, s_kh,
    s_tb,
    s_ab, s_ah, s_as,
    s_mb, s_mh,
    REP: tl.constexpr, REP_P: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, PER: tl.constexpr, PDL: tl.constexpr,
):
    pdl_prologue(PDL)
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
        num_warps=4, num_stages=2, **launch_options(q.device),
    )
    out = torch.empty_like(q)
    _merge_kernel[(b, h)](
        acc, m, lsum, out,
        acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1), out.stride(0), out.stride(1),
        S=splits, S_P=triton.next_power_of_2(splits), D=d, num_warps=4, **launch_options(q.device),
    )
    return out


@triton.jit
def _merge_kernel(
    ACC, M, L, OUT,
    s_ab, s_ah, s_as, s_mb, s_mh, s_ob, s_oh,
    S: tl.constexpr, S_P: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr,
):
    pdl_prologue(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, S_P)
    d = tl.arange(0, D)
    ok = sp < S
    m = tl.load(M + b * s_mb + h * s_mh + sp, mask=ok, other=_NEG)
    lsum = tl.load(L + b * s_mb + h * s_mh + sp, mask=ok, other=0.0)
    acc = tl.load(ACC + b * s_ab + h * s_ah + sp[:, None] * s_as + d[None, :], mask=ok[:, None], other=0.0)
    w = tl.exp(m - tl.max(m, 0))  # [S_P]
    o = tl.sum(acc * w[:, None], 0) / tl.sum(lsum * w, 0)
    tl.store(OUT + b * s_ob + h * s_oh + d, o.to(OUT.dtype.element_ty))


@triton.jit
def _rope_cache_kernel(
    Q, K, V, COS, SIN, POS, WRITE, KC, VC, QO,
    s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_cp, s_cr, s_ch, s_ob, s_oh,
    H: tl.constexpr, HALF: tl.constexpr, INTERLEAVED: tl.constexpr, PDL: tl.constexpr,
):
    pdl_prologue(PDL)
    b = tl.program_id(0)
    hh = tl.program_id(1)  # 0..H-1: a query head; H..H+Hkv-1: a KV head
    p = tl.load(POS + b)
    i = tl.arange(0, HALF)
    if INTERLEAVED:  # pairs (x[2i], x[2i + 1]): llama.cpp's NORM layout
        lo_i = 2 * i
        hi_i = 2 * i + 1
    else:  # pairs (x[i], x[i + D/2]): rotate_half
        lo_i = i
        hi_i = i + HALF
    c = tl.load(COS + p * s_cp + lo_i).to(tl.float32)  # the tables hold each angle at both places
    sn = tl.load(SIN + p * s_cp + lo_i).to(tl.float32)
    if hh < H:
        x0 = tl.load(Q + b * s_qb + hh * s_qh + lo_i).to(tl.float32)
        x1 = tl.load(Q + b * s_qb + hh * s_qh + hi_i).to(tl.float32)
        tl.store(QO + b * s_ob + hh * s_oh + lo_i, (x0 * c - x1 * sn).to(QO.dtype.element_ty))
        tl.store(QO + b * s_ob + hh * s_oh + hi_i, (x1 * c + x0 * sn).to(QO.dtype.element_ty))
    else:
        g = hh - H
        row = tl.load(WRITE + b)
        x0 = tl.load(K + b * s_kb + g * s_kh + lo_i).to(tl.float32)
        x1 = tl.load(K + b * s_kb + g * s_kh + hi_i).to(tl.float32)
        dst = row * s_cr + g * s_ch
        tl.store(KC + dst + lo_i, (x0 * c - x1 * sn).to(KC.dtype.element_ty))
        tl.store(KC + dst + hi_i, (x1 * c + x0 * sn).to(KC.dtype.element_ty))
        v0 = tl.load(V + b * s_vb + g * s_vh + lo_i)
        v1 = tl.load(V + b * s_vb + g * s_vh + hi_i)
        tl.store(VC + dst + lo_i, v0.to(VC.dtype.element_ty))
        tl.store(VC + dst + hi_i, v1.to(VC.dtype.element_ty))


def rope_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    write: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    interleaved: bool,
) -> torch.Tensor:
    b, h, d = q.shape
    hkv = k.shape[1]
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1 or cos.stride(1) != 1:
        raise ValueError("rope_and_cache needs the head dimension contiguous")
    kc, vc = k_cache.flatten(0, 1), v_cache.flatten(0, 1)  # [rows, Hkv, D]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    _rope_cache_kernel[(b, h + hkv)](
        q, k, v, cos, sin, pos, write, kc, vc, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        kc.stride(0), kc.stride(1), out.stride(0), out.stride(1),
        H=h, HALF=d // 2, INTERLEAVED=interleaved, num_warps=1, **launch_options(q.device),
    )
    return out
