"""Paged KV cache: fixed-size blocks of positions, handed to sessions as they grow (vLLM's layout idea).

Each layer's K and V live in one preallocated tensor [n_blocks, block_size, kv_heads, head_dim]. A
session (a row of the block table, the "slot") holds only the blocks its positions reach, so a pool
sized for the expected total of tokens serves many more sessions than one sized max_context per
session. Block 0 is never handed out: padded rows of a captured decode batch write there.

The block table exists twice: on the host (the bookkeeping, read by the CPU path and by prefill) and
on the device (read by the decode kernel, so a captured step finds its blocks without a host round
trip). Device rows are refreshed only when a session gains or loses a block, once per block_size
tokens.
"""

from __future__ import annotations

import heapq
import threading

import torch

PAD_BLOCK = 0  # scratch block for padded batch rows; never allocated to a session


class KVCacheFull(Exception):
    """The pool has no free block for a session's new positions."""


def blocks_for(n_positions: int, block_size: int) -> int:
    """Blocks that hold positions [0, n_positions)."""
    return -(-n_positions // block_size)


class PagedKVCache:
    """K/V blocks of `n_layers` layers, a block table of `max_sessions` rows (plus one pad row)."""

    def __init__(
        self,
        n_layers: int,
        kv_heads: int,
        head_dim: int,
        *,
        max_sessions: int,
        max_context: int,
        pool_tokens: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        if block_size < 1 or pool_tokens < 1 or max_sessions < 1 or max_context < 1:
            raise ValueError("block_size, pool_tokens, max_sessions and max_context must be >= 1")
        self.block_size = block_size
        self.max_sessions = max_sessions
        self.max_blocks = blocks_for(max_context, block_size)  # per session
        self.n_blocks = blocks_for(pool_tokens, block_size) + 1  # + the pad block
        self.device, self.dtype = device, dtype
        shape = (self.n_blocks, block_size, kv_heads, head_dim)
        # CPU: untouched blocks stay unbacked pages, and blocks are handed out lowest first, so
        # resident memory follows the tokens in use. CUDA: zeros, so a pad row reads numbers, not NaN.
        new = torch.empty if device.type == "cpu" else torch.zeros
        self.k = [new(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [new(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self._free = list(range(1, self.n_blocks))  # a heap: lowest block first
        self._owned: list[list[int]] = [[] for _ in range(max_sessions)]
        # host table (int64 for indexing), row max_sessions is the pad row: all PAD_BLOCK
        self.table = torch.full((max_sessions + 1, self.max_blocks), PAD_BLOCK, dtype=torch.int64)
        self.table_dev = self.table.to(device, torch.int32) if device.type != "cpu" else self.table
        self._dirty = False
        self._lock = threading.Lock()  # sessions open and close on several threads

    @property
    def pad_slot(self) -> int:
        return self.max_sessions

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_of(self, slot: int) -> int:
        return len(self._owned[slot])

    def ensure(self, slot: int, end: int) -> None:
        """Gives `slot` the blocks for positions [0, end); raises KVCacheFull (taking none) if the pool
        cannot, and ValueError past max_context."""
        need = blocks_for(end, self.block_size)
        if need > self.max_blocks:
            raise ValueError(f"position {end - 1} is past this cache's context")
        owned = self._owned[slot]
        if need <= len(owned):
            return
        with self._lock:
            self._take(owned, slot, need - len(owned))

    def _take(self, owned: list[int], slot: int, more: int) -> None:
        if more > len(self._free):
            raise KVCacheFull(
                f"KV cache full: {more} more blocks of {self.block_size} positions needed, {len(self._free)} free"
            )
        for _ in range(more):
            block = heapq.heappop(self._free)
            self.table[slot, len(owned)] = block
            owned.append(block)
        self._dirty = True

    def release(self, slot: int) -> None:
        """Returns every block of `slot` to the pool."""
        with self._lock:
            owned = self._owned[slot]
            for block in owned:
                heapq.heappush(self._free, block)
            if owned:
                self.table[slot, : len(owned)] = PAD_BLOCK
                self._dirty = True
            owned.clear()

    def sync_table(self) -> None:
        """Brings the device table up to date before a step reads it (a no-op on CPU)."""
        with self._lock:
            if self._dirty and self.table_dev is not self.table:
                self.table_dev.copy_(self.table)  # small: rows x max_blocks int32
            self._dirty = False

    def write_index(self, slot: int, start: int, end: int) -> torch.Tensor:
        """Flat row indices [end - start] of positions [start, end) of `slot` in a layer's cache seen as
        [n_blocks * block_size, kv_heads, head_dim] (host int64; the blocks must be ensured)."""
        pos = torch.arange(start, end)
        return self.table[slot, pos // self.block_size] * self.block_size + pos % self.block_size

    def gather(self, layer: int, slot: int, lo: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of positions [lo, end) of `slot`: [kv_heads, end - lo, head_dim] each (copies)."""
        first, last = lo // self.block_size, blocks_for(end, self.block_size)
        blocks = self.table[slot, first:last].to(self.device)
        off = lo - first * self.block_size
        out = []
        for cache in (self.k[layer], self.v[layer]):
            rows = cache.index_select(0, blocks).flatten(0, 1)[off : off + end - lo]  # [L, Hkv, D]
            out.append(rows.transpose(0, 1))
        return out[0], out[1]
