"""CPU decode attention (engine/paged_attention.py `decode_attention_host`) gives a session the same
bits in any batch: failover replays a stream alone and checks its tokens."""

import pytest
import torch

from engine.kv_cache import PagedKVCache
from engine.paged_attention import decode_attention_host


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "window"), [(9, 3, 64, 0), (4, 1, 256, 0), (8, 2, 64, 24)])
def test_host_attention_gives_each_session_its_bits_alone(heads, kv_heads, head_dim, window) -> None:
    """Batched, a session's keys are a view of one gather of every session's keys; alone they are
    the whole gather: the same bits (failover replays a stream alone and checks its tokens)."""
    g = torch.Generator().manual_seed(1)
    kv = PagedKVCache(
        2, kv_heads, head_dim, max_sessions=4, max_context=256, pool_tokens=1024, block_size=16,
        device=torch.device("cpu"), dtype=torch.float16,
    )
    for layer in range(2):
        kv.k[layer].copy_(torch.randn(kv.k[layer].shape, generator=g))
        kv.v[layer].copy_(torch.randn(kv.v[layer].shape, generator=g))
    slots, positions = [2, 0, 3, 1], [0, 130, 37, 200]
    for s, p in zip(slots, positions, strict=True):
        kv.ensure(s, p + 1)
    q = torch.randn(4, heads, head_dim, generator=g)
    together = decode_attention_host(q, kv, 1, slots, positions, window=window, scale=0.125)
    for b in range(4):
        alone = decode_attention_host(q[b : b + 1], kv, 1, slots[b : b + 1], positions[b : b + 1], window=window, scale=0.125)
        assert torch.equal(alone[0], together[b]), b
