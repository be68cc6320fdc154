"""Paged KV cache: fixed-size blocks of positions, handed to sessions as they grow (vLLM's layout idea).

Each layer's K and V live in one preallocated tensor [n_blocks, block_size, kv_heads, head_dim]. A
session (a row of the block table, the "slot") holds only the blocks its positions reach, so a pool
sized for the expected total of tokens serves many more sessions than one sized max_context per
session. Block 0 is never handed out: padded rows of a captured decode batch write there.

The block table exists twice: on the host (the bookkeeping, read by the CPU path and by prefill) and
on the device (read by the decode kernel, so a captured step finds its blocks without a host round
trip). Device rows are refreshed only when a session gains or loses a block, once per block_size
tokens.

Sliding-window layers (Gemma 3: five layers in six) read only the last `window` keys, so they keep
their own, smaller pool and table: a session holds the blocks of its window and of the step in
flight, and each step gives back the blocks that fell out of the window (its table entries go back
to the pad block, which attention masks). The layers that see everything keep every position.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Sequence

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
        window: int = 0,
        window_layers: Sequence[bool] = (),
        window_pool_tokens: int = 0,
        window_step: int = 1,
    ) -> None:
        """`window_layers[i]`: layer i is a sliding-window layer of `window` positions; those layers
        share a pool of `window_pool_tokens` positions, sized for steps of up to `window_step`."""
        if block_size < 1 or pool_tokens < 1 or max_sessions < 1 or max_context < 1:
            raise ValueError("block_size, pool_tokens, max_sessions and max_context must be >= 1")
        self.window = window if window > 0 and any(window_layers) else 0
        self.window_step = max(1, window_step)
        self._is_window = [bool(w) and self.window > 0 for w in window_layers] or [False] * n_layers
        if len(self._is_window) != n_layers:
            raise ValueError("window_layers must name every layer")
        self.block_size = block_size
        self.max_sessions = max_sessions
        self.max_blocks = blocks_for(max_context, block_size)  # per session
        self.n_blocks = blocks_for(pool_tokens, block_size) + 1  # + the pad block
        self.device, self.dtype = device, dtype
        shape = (self.n_blocks, block_size, kv_heads, head_dim)
        # CPU: untouched blocks stay unbacked pages, and blocks are handed out lowest first, so
        # resident memory follows the tokens in use. CUDA: zeros, so a pad row reads numbers, not NaN.
        new = torch.empty if device.type == "cpu" else torch.zeros
        self.n_blocks_w = blocks_for(window_pool_tokens, block_size) + 1 if self.window else 1
        shape_w = (self.n_blocks_w, block_size, kv_heads, head_dim)
        self.k = [new(shape_w if w else shape, device=device, dtype=dtype) for w in self._is_window]
        self.v = [new(shape_w if w else shape, device=device, dtype=dtype) for w in self._is_window]
        self._free = list(range(1, self.n_blocks))  # a heap: lowest block first
        self._owned: list[list[int]] = [[] for _ in range(max_sessions)]
        # host table (int64 for indexing), row max_sessions is the pad row: all PAD_BLOCK
        self.table = torch.full((max_sessions + 1, self.max_blocks), PAD_BLOCK, dtype=torch.int64)
        self.table_dev = self.table.to(device, torch.int32) if device.type != "cpu" else self.table
        # the sliding-window layers' pool: a session's blocks by logical block number, those below
        # `_dropped[slot]` given back
        self._free_w = list(range(1, self.n_blocks_w))
        self._owned_w: list[dict[int, int]] = [{} for _ in range(max_sessions)]
        self._dropped = [0] * max_sessions
        self.table_w = torch.full((max_sessions + 1, self.max_blocks), PAD_BLOCK, dtype=torch.int64)
        self.table_w_dev = self.table_w.to(device, torch.int32) if device.type != "cpu" else self.table_w
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

    def window_blocks_of(self, slot: int) -> int:
        return len(self._owned_w[slot])

    @property
    def free_window_blocks(self) -> int:
        return len(self._free_w)

    def is_window(self, layer: int) -> bool:
        return self._is_window[layer]

    def can_hold(self, positions: int) -> bool:
        """Whether a session of `positions` positions (fed in steps of `window_step`) fits the free blocks."""
        if self.free_blocks < blocks_for(positions, self.block_size):
            return False
        return not self.window or self.free_window_blocks >= blocks_for(
            min(positions, self.window + self.window_step), self.block_size) + 1  # fmt: skip

    def ensure(self, slot: int, end: int, start: int | None = None, window_end: int | None = None) -> None:
        """Gives `slot` the blocks for a step that writes positions [start, end) (default: one position)
        and reads keys before them; raises KVCacheFull (taking none) if the pool cannot, and
        ValueError past max_context or for a step that needs keys the window layers gave back.
        `window_end`: the window layers' blocks only up to there (a long prompt that runs in chunks
        takes its full-layer blocks at once, its window blocks chunk by chunk)."""
        need = blocks_for(end, self.block_size)
        need_w = blocks_for(min(end, window_end or end), self.block_size)
        if need > self.max_blocks:
            raise ValueError(f"position {end - 1} is past this cache's context")
        first = end - 1 if start is None else start
        lo = max(0, first - self.window + 1) // self.block_size if self.window else 0  # oldest block read
        if self.window and lo < self._dropped[slot]:
            raise ValueError(f"position {first} rewinds past the keys the sliding-window layers still hold")
        owned, owned_w = self._owned[slot], self._owned_w[slot]
        more_w = [b for b in range(lo, need_w) if b not in owned_w] if self.window else []
        if need <= len(owned) and not more_w and (not self.window or lo <= self._dropped[slot]):
            return
        with self._lock:
            gone = [b for b in owned_w if b < lo]  # out of the window for good: back to the pool first
            if need - len(owned) > len(self._free) or len(more_w) > len(self._free_w) + len(gone):
                raise KVCacheFull(
                    f"KV cache full: {max(0, need - len(owned))} + {len(more_w)} more blocks of {self.block_size} "
                    f"positions needed, {len(self._free)} + {len(self._free_w)} free"
                )
            for b in gone:
                heapq.heappush(self._free_w, owned_w.pop(b))
                self.table_w[slot, b] = PAD_BLOCK
            while len(owned) < need:
                block = heapq.heappop(self._free)
                self.table[slot, len(owned)] = block
                owned.append(block)
            for b in more_w:
                owned_w[b] = heapq.heappop(self._free_w)
                self.table_w[slot, b] = owned_w[b]
            if self.window:
                self._dropped[slot] = max(self._dropped[slot], lo)
            self._dirty = True

    def release(self, slot: int) -> None:
        """Returns every block of `slot` to the pool."""
        with self._lock:
            owned, owned_w = self._owned[slot], self._owned_w[slot]
            for block in owned:
                heapq.heappush(self._free, block)
            for block in owned_w.values():
                heapq.heappush(self._free_w, block)
            if owned or owned_w:
                self.table[slot] = PAD_BLOCK
                self.table_w[slot] = PAD_BLOCK
                self._dirty = True
            owned.clear()
            owned_w.clear()
            self._dropped[slot] = 0

    def sync_table(self) -> None:
        """Brings the device tables up to date before a step reads them (a no-op on CPU)."""
        with self._lock:
            if self._dirty and self.table_dev is not self.table:
                self.table_dev.copy_(self.table)  # small: rows x max_blocks int32
                if self.window:
                    self.table_w_dev.copy_(self.table_w)
            self._dirty = False

    def table_of(self, layer: int) -> torch.Tensor:
        """The host block table layer `layer` reads (the window layers' own, or the full one)."""
        return self.table_w if self._is_window[layer] else self.table

    def write_index(self, slot: int, start: int, end: int, window: bool = False) -> torch.Tensor:
        """Flat row indices [end - start] of positions [start, end) of `slot` in a layer's cache seen as
        [n_blocks * block_size, kv_heads, head_dim] (host int64; the blocks must be ensured); `window`:
        in the sliding-window layers' cache."""
        pos = torch.arange(start, end)
        table = self.table_w if window else self.table
        return table[slot, pos // self.block_size] * self.block_size + pos % self.block_size

    def gather(self, layer: int, slot: int, lo: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of positions [lo, end) of `slot`: [kv_heads, end - lo, head_dim] each (copies)."""
        first, last = lo // self.block_size, blocks_for(end, self.block_size)
        blocks = self.table_of(layer)[slot, first:last].to(self.device)
        off = lo - first * self.block_size
        out = []
        for cache in (self.k[layer], self.v[layer]):
            rows = cache.index_select(0, blocks).flatten(0, 1)[off : off + end - lo]  # [L, Hkv, D]
            out.append(rows.transpose(0, 1))
        return out[0], out[1]
