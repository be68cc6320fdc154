"""The sliding-window layers' own KV pool (engine/kv_cache.py): a session holds its window and the step
in flight, gives back what fell out, refuses to rewind past it, and takes a long prompt's window blocks
chunk by chunk."""

import pytest
import torch

from engine.kv_cache import PAD_BLOCK, KVCacheFull, PagedKVCache, blocks_for


def test_window_layers_hold_only_their_window() -> None:
    """A sliding-window layer's pool: a session holds the blocks of its last `window` positions and of
    the step in flight, gives back the rest as it grows, refuses to rewind past them, and returns all."""
    kv = PagedKVCache(2, 1, 4, max_sessions=2, max_context=1024, pool_tokens=2048, block_size=32,
                      device=torch.device("cpu"), dtype=torch.float16, window=64, window_layers=[True, False],
                      window_pool_tokens=2 * 4 * 32, window_step=16)
    full, window = kv.free_blocks, kv.free_window_blocks
    assert kv.k[0].shape[0] == 4 * 2 + 1 and kv.k[1].shape[0] == 64 + 1  # + the pad block each
    kv.ensure(0, 40, 0)  # a 40-position prompt
    for p in range(40, 500):  # then one position a step
        kv.ensure(0, p + 1)
        held = kv.window_blocks_of(0)
        assert held <= blocks_for(64, 32) + 1, (p, held)
        assert kv.table_w[0, max(0, p - 63) // 32] != PAD_BLOCK and kv.table_w[0, p // 32] != PAD_BLOCK  # keys it reads
        if p >= 128:
            assert kv.table_w[0, : (p - 63) // 32].eq(PAD_BLOCK).all()  # older blocks went back
    assert kv.blocks_of(0) == blocks_for(500, 32)  # the full layer keeps every position
    with pytest.raises(ValueError, match="rewinds past"):
        kv.ensure(0, 201, 200)
    kv.ensure(0, 501, 480)  # a rewind within the window is fine
    kv.release(0)
    assert (kv.free_blocks, kv.free_window_blocks) == (full, window)
    assert kv.table_w[0].eq(PAD_BLOCK).all()


def test_a_long_prompt_takes_its_window_blocks_chunk_by_chunk() -> None:
    kv = PagedKVCache(1, 1, 4, max_sessions=1, max_context=4096, pool_tokens=4096, block_size=32,
                      device=torch.device("cpu"), dtype=torch.float16, window=64, window_layers=[True],
                      window_pool_tokens=6 * 32, window_step=128)
    kv.ensure(0, 3000, 0, window_end=128)  # what the engine does before a 3,000-position prompt
    assert kv.window_blocks_of(0) == 4
    for start in range(128, 3000, 128):  # then each chunk, as ShardModel.prefill asks
        kv.ensure(0, min(3000, start + 128), start)
        assert kv.window_blocks_of(0) <= 6
    kv.release(0)
    with pytest.raises(KVCacheFull):  # the pool is the window's size: the whole prompt at once does not fit
        kv.ensure(0, 3000, 0)
    assert kv.blocks_of(0) == 0 and kv.window_blocks_of(0) == 0  # and nothing was taken
