"""Fetching pieces of a model from several sources at once, each piece verified before it is written.

Each source gets as many concurrent requests as it allows (its advertised serve cap, at most
`MAX_STREAMS_PER_SOURCE`); each request asks for a small batch of pieces it holds that nobody is
fetching. A piece whose hash is wrong drops its source for the rest of the fetch (counted as
`bad_piece`); a source that fails (killed, unreachable) is dropped too (`source_failed`), and its
unfinished pieces go back to the queue for the others. A busy source is retried after a pause. The
fetch fails only when pieces are left that no remaining source holds.

Transport-free: a `Source` is anything that streams (index, bytes) for a list of pieces
(`dataplane/weights_client.py` over gRPC; fakes in tests).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from shard.manifest import Manifest, Piece

BATCH_PIECES = 8  # 8 MiB a request at 1 MiB pieces: large enough to stream, small enough to balance
MAX_STREAMS_PER_SOURCE = 4
BUSY_PAUSE_S = 0.5
MAX_BUSY_TRIES = 20


class FetchError(Exception):
    """Pieces are missing and no source is left that holds them."""


class SourceBusy(Exception):
    """The source serves as many streams as it allows right now; ask again later."""


class Source(Protocol):
    node_id: str
    streams: int

    def has(self, index: int) -> bool: ...

    def fetch(self, pieces: list[Piece]) -> AsyncIterator[tuple[int, bytes]]: ...


@dataclass
class FetchProgress:
    """What a fetch has done so far (read by /mesh/self and the logs)."""

    what: str
    total_bytes: int
    done_bytes: int = 0
    started_s: float = field(default_factory=time.monotonic)
    by_source: dict[str, int] = field(default_factory=dict)  # node id -> verified bytes it sent
    active: set[str] = field(default_factory=set)
    dropped: dict[str, str] = field(default_factory=dict)  # node id -> why

    def rate_bytes_s(self, now_s: float | None = None) -> float:
        elapsed = (now_s or time.monotonic()) - self.started_s
        return self.done_bytes / elapsed if elapsed > 0 else 0.0

    def snapshot(self) -> dict:
        rate = self.rate_bytes_s()
        left = self.total_bytes - self.done_bytes
        return {"what": self.what, "total_bytes": self.total_bytes, "done_bytes": self.done_bytes,
                "rate_bytes_s": round(rate), "eta_s": round(left / rate, 1) if rate > 0 else None,
                "sources": sorted(self.active), "bytes_by_source": dict(self.by_source),
                "dropped": dict(self.dropped)}


Verify = Callable[[Piece, bytes], bool]
Write = Callable[[Piece, bytes], None]  # blocking; runs on a worker thread
OnBad = Callable[[str, str, str], None]  # (reason, node id, detail)


async def fetch_pieces(manifest: Manifest, pieces: list[Piece], sources: Sequence[Source], write: Write,
                       progress: FetchProgress, on_bad: OnBad) -> None:
    """Fetches `pieces` (those not yet written) from `sources`; returns when every one is written."""
    pending: dict[int, Piece] = {p.index: p for p in pieces}
    in_flight: set[int] = set()
    dropped: set[str] = set()
    changed = asyncio.Event()

    def take(source: Source) -> list[Piece]:
        batch: list[Piece] = []
        for index, piece in pending.items():
            if index not in in_flight and source.has(index):
                batch.append(piece)
                if len(batch) >= BATCH_PIECES:
                    break
        in_flight.update(p.index for p in batch)
        return batch

    def verify_and_write(piece: Piece, data: bytes) -> bool:
        if not manifest.check_piece(piece.index, data):
            return False
        write(piece, data)
        return True

    def drop(source: Source, reason: str, detail: str) -> None:
        if source.node_id not in dropped:
            dropped.add(source.node_id)
            progress.dropped[source.node_id] = reason
            on_bad(reason, source.node_id, detail)

    async def worker(source: Source) -> None:
        busy = 0
        while pending and source.node_id not in dropped:
            batch = take(source)
            if not batch:
                if not in_flight:
                    return  # nothing left that this source holds
                changed.clear()
                await changed.wait()  # a failed request may hand pieces back
                continue
            wanted = {p.index: p for p in batch}
            try:
                async for index, data in source.fetch(batch):
                    piece = wanted.pop(index, None)
                    if piece is None:
                        drop(source, "bad_piece", f"sent piece {index}, not asked for")
                        break
                    if not await asyncio.to_thread(verify_and_write, piece, data):
                        drop(source, "bad_piece", f"piece {index} does not match the manifest")
                        break
                    pending.pop(index, None)
                    in_flight.discard(index)
                    progress.done_bytes += piece.length
                    progress.by_source[source.node_id] = progress.by_source.get(source.node_id, 0) + piece.length
                    busy = 0
                if wanted and source.node_id not in dropped:
                    drop(source, "source_failed", f"stream ended with {len(wanted)} pieces unsent")
            except SourceBusy:
                busy += 1
                if busy > MAX_BUSY_TRIES:
                    drop(source, "source_failed", "busy for too long")
                else:
                    await asyncio.sleep(BUSY_PAUSE_S)
            except (TimeoutError, OSError, ConnectionError) as e:
                drop(source, "source_failed", str(e)[:200])
            finally:
                in_flight.difference_update(p.index for p in batch if p.index in pending)  # back to the queue
                changed.set()

    async def run(source: Source) -> None:
        progress.active.add(source.node_id)
        try:
            await asyncio.gather(*(worker(source) for _ in range(max(1, min(source.streams, MAX_STREAMS_PER_SOURCE)))))
        finally:
            progress.active.discard(source.node_id)
            changed.set()

    await asyncio.gather(*(run(s) for s in sources))
    if pending:
        holders = sum(1 for s in sources if s.node_id not in dropped)
        raise FetchError(f"{len(pending)} pieces ({sum(p.length for p in pending.values()) / 2**20:.1f} MiB) "
                         f"could not be fetched: {holders} of {len(sources)} sources left, none holding them")
