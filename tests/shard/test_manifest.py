"""The content manifest (shard/manifest.py), the weights cache (shard/weight_cache.py) and the
multi-source fetcher (shard/fetch.py), on the real SmolLM2 GGUF and fake sources."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

import pytest
from conftest import model_file

from shard.fetch import FetchError, FetchProgress, SourceBusy, fetch_pieces
from shard.manifest import (
    HEADER,
    Manifest,
    ManifestError,
    build_manifest,
    check_header_matches,
    decode_manifest,
    layout,
    range_pieces,
    range_segments,
)
from shard.weight_cache import CacheError, WeightCache

SMOL = model_file("smollm2-135m-instruct")
PIECE = 256 << 10


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return build_manifest(SMOL.path, SMOL.digest, SMOL.alias, piece_bytes=PIECE)


def test_segments_tile_the_file_and_round_trip(manifest):
    assert manifest.segments[0].name == HEADER and manifest.segments[0].offset == 0
    assert sum(s.length for s in manifest.segments) == manifest.file_size == Path(SMOL.path).stat().st_size
    back = decode_manifest(manifest.encode(), SMOL.digest)
    assert back == manifest and back.manifest_id == manifest.manifest_id
    # deterministic: every holder of the file builds the same bytes
    assert build_manifest(SMOL.path, SMOL.digest, SMOL.alias, piece_bytes=PIECE).encode() == manifest.encode()


def test_every_piece_hash_matches_the_file(manifest):
    data = Path(SMOL.path).read_bytes()
    for p in manifest.all_pieces():
        assert manifest.check_piece(p.index, data[p.offset : p.offset + p.length])
    assert not manifest.check_piece(0, b"x" + data[1 : manifest.all_pieces()[0].length])
    # the pieces, read in order, are the file: their concatenation hashes to the model digest
    assert hashlib.sha256(b"".join(data[p.offset : p.offset + p.length] for p in manifest.all_pieces())).hexdigest() == SMOL.digest


@pytest.mark.parametrize(("start", "end", "embd", "head"), [(0, 10, True, False), (10, 20, False, False), (20, 30, True, True)])
def test_a_range_needs_its_blocks_and_ends(manifest, start, end, embd, head):
    names = {s.name for s in range_segments(manifest, start, end, 30)}
    assert HEADER in names
    assert {int(n.split(".")[1]) for n in names if n.startswith("blk.")} == set(range(start, end))
    assert ("token_embd.weight" in names) == embd  # SmolLM2 ties the head to the embedding
    assert ("output_norm.weight" in names) == head
    whole = {p.index for p in manifest.all_pieces()}
    parts = [range_pieces(manifest, a, b, 30) for a, b in ((0, 10), (10, 20), (20, 30))]
    assert set().union(*({p.index for p in part} for part in parts)) == whole


@pytest.mark.parametrize("mutate", [
    lambda m: m.encode()[:-1],  # truncated
    lambda m: Manifest("0" * 64, m.file_size, m.piece_bytes, m.segments, m.hashes).encode(),  # another model
    lambda m: Manifest(m.digest, m.file_size + 1, m.piece_bytes, m.segments, m.hashes).encode(),  # gap
    lambda m: Manifest(m.digest, m.file_size, m.piece_bytes, m.segments, m.hashes[:-32]).encode(),  # a hash short
    lambda m: Manifest(m.digest, m.file_size, m.piece_bytes, m.segments[1:], m.hashes).encode(),  # no header
    lambda m: b"\xc1" * 10,
])
def test_bad_manifests_are_refused(manifest, mutate):
    with pytest.raises(ManifestError):
        decode_manifest(mutate(manifest), SMOL.digest)


def test_layout_refuses_overlaps():
    with pytest.raises(ManifestError):
        layout(100, [("a", 100), ("b", 90)], 200)


def test_header_must_list_the_manifest_tensors(manifest, tmp_path):
    header = Path(SMOL.path).read_bytes()[: manifest.segments[0].length]
    check_header_matches(manifest, header, manifest.file_size)
    other = Manifest(manifest.digest, manifest.file_size, manifest.piece_bytes,
                     (manifest.segments[0], *manifest.segments[2:3]), manifest.hashes)
    with pytest.raises(ManifestError):
        check_header_matches(other, header, manifest.file_size)


class FakeSource:
    def __init__(self, node_id: str, data: bytes, *, corrupt: bool = False, die_after: int | None = None,
                 busy: int = 0, holds: set[int] | None = None) -> None:
        self.node_id, self.streams = node_id, 2
        self._data, self._corrupt, self._die_after, self._busy, self._holds = data, corrupt, die_after, busy, holds
        self.sent = 0

    def has(self, index: int) -> bool:
        return self._holds is None or index in self._holds

    async def fetch(self, pieces):
        if self._busy:
            self._busy -= 1
            raise SourceBusy("busy")
        for p in pieces:
            if self._die_after is not None and self.sent >= self._die_after:
                raise ConnectionError("killed")
            chunk = self._data[p.offset : p.offset + p.length]
            if self._corrupt:
                chunk = bytes([chunk[0] ^ 1]) + chunk[1:]
            self.sent += 1
            await asyncio.sleep(0)
            yield p.index, chunk


def _fetch(manifest, sources, tmp_path, pieces=None):
    cache = WeightCache(tmp_path)
    entry = cache.open(manifest, "smol")
    bad: list[tuple[str, str]] = []
    pieces = manifest.all_pieces() if pieces is None else pieces
    progress = FetchProgress("test", sum(p.length for p in pieces))
    try:
        asyncio.run(fetch_pieces(manifest, pieces, sources, entry.write, progress, lambda r, n, d: bad.append((r, n))))
    finally:
        entry.flush()
    return entry, progress, bad


def test_two_sources_a_corrupt_one_and_a_dying_one(manifest, tmp_path):
    data = Path(SMOL.path).read_bytes()
    good, liar, dying = FakeSource("good", data), FakeSource("liar", data, corrupt=True), FakeSource("dies", data, die_after=5)
    entry, progress, bad = _fetch(manifest, [liar, dying, good], tmp_path)
    assert ("bad_piece", "liar") in bad and ("source_failed", "dies") in bad
    assert entry.complete and hashlib.sha256(entry.path.read_bytes()).hexdigest() == SMOL.digest
    assert progress.done_bytes == manifest.file_size and "liar" not in progress.by_source


def test_busy_sources_are_retried(manifest, tmp_path):
    data = Path(SMOL.path).read_bytes()
    pieces = range_pieces(manifest, 10, 12, 30)
    entry, progress, bad = _fetch(manifest, [FakeSource("a", data, busy=2)], tmp_path, pieces)
    assert not bad and not entry.missing(pieces)


def test_no_source_left_is_an_error_and_the_verified_pieces_stay(manifest, tmp_path):
    data = Path(SMOL.path).read_bytes()
    with pytest.raises(FetchError):
        _fetch(manifest, [FakeSource("dies", data, die_after=3)], tmp_path)
    (entry,) = WeightCache(tmp_path).load()
    assert sum(entry.has(i) for i in range(manifest.n_pieces)) == 3  # a restarted fetch resumes after these


def test_cache_reloads_and_a_range_loads_from_the_sparse_file(manifest, tmp_path):
    from shard.loader import load_shard
    from shard.spec import ShardSpec

    data = Path(SMOL.path).read_bytes()
    pieces = range_pieces(manifest, 10, 20, 30)
    entry, progress, _ = _fetch(manifest, [FakeSource("a", data)], tmp_path, pieces)
    entry.add_range(10, 20)
    assert progress.done_bytes == sum(p.length for p in pieces) < manifest.file_size / 2
    assert entry.disk_bytes() < manifest.file_size / 2  # sparse: only what was fetched takes disk
    (again,) = WeightCache(tmp_path).load()
    assert again.ranges == [(10, 20)] and again.has_range(10, 20, 30) and not again.has_range(0, 10, 30)
    weights = load_shard(again.path, ShardSpec(SMOL.digest, 10, 20, 30))
    original = load_shard(SMOL.path, ShardSpec(SMOL.digest, 10, 20, 30))
    assert (weights.layers[3].wq.data == original.layers[3].wq.data).all()


def test_disk_budget_is_one_line_and_cleans_up(manifest, tmp_path):
    cache = WeightCache(tmp_path, disk_budget_bytes=1 << 20)
    entry = cache.open(manifest, "smol")
    with pytest.raises(CacheError, match="disk-budget"):
        cache.reserve(entry, manifest.all_pieces())
    cache.discard_partial(entry)
    assert not list((tmp_path / "weights").glob("*.gguf"))


logging.getLogger("shard").setLevel(logging.WARNING)
