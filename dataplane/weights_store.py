"""A node's weights: the whole GGUFs it has (as sources), its cache of fetched pieces, and fetching.

`ensure_range` makes the cache hold layers [start, end) of a model (the header, those layers' tensors,
the embedding/head they need), fetching what is missing from the members that advertise the bytes;
`pull` does the same for the whole file and checks its sha256 against the digest. `lookup` is what
`FetchTensors` serves from. Bad bytes and failed sources are counted in `rejects` (the same counters
as refused adverts) and routed around (`shard/fetch.py`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dataplane.channels import PeerChannels
from dataplane.weights import Served
from dataplane.weights_client import GrpcSource, fetch_manifest
from discovery.advert import FileAdvert, NodeAdvert
from discovery.rejects import RejectCounter
from shard.fetch import FetchError, FetchProgress, fetch_pieces
from shard.manifest import (
    HEADER,
    Manifest,
    ManifestError,
    build_manifest,
    check_header_matches,
    decode_manifest,
    range_pieces,
)
from shard.weight_cache import CachedModel, CacheError, WeightCache

log = logging.getLogger(__name__)
PROGRESS_LOG_S = 2.0


class WeightsError(Exception):
    """A fetch that cannot be done: nobody holds the bytes, the disk budget, a full disk (one line)."""


@dataclass(frozen=True, slots=True)
class Held:
    """Bytes this node holds of one model, as advertised: layers [start, end) (whole: end == n_layers)."""

    digest: str
    alias: str
    path: Path
    start: int
    end: int
    n_layers: int
    manifest_id: str
    cached: bool  # in the cache (else a whole file the node was started with)


class WeightStore:
    def __init__(self, data_dir: Path, channels: PeerChannels, *, node_id: str, disk_budget_bytes: int | None,
                 serve_streams: int, rejects: RejectCounter, on_change: Callable[[], None] = lambda: None) -> None:
        self.cache = WeightCache(data_dir, disk_budget_bytes)
        self._manifest_dir = Path(data_dir) / "manifests"
        self._channels = channels
        self._node_id = node_id
        self.serve_streams = serve_streams
        self.rejects = rejects
        self._on_change = on_change
        self._files: dict[str, tuple[Path, Manifest, bytes]] = {}  # whole files: digest -> (path, manifest, bytes)
        self._served: dict[str, Served] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.fetching: dict[str, FetchProgress] = {}
        self.fetched_bytes: dict[str, int] = {}  # digest -> verified bytes fetched since start
        self.last_fetch: dict[str, dict] = {}  # digest -> the last fetch's summary

    # --- what we hold (blocking set-up, then reads) ------------------------------------------------------
    def start(self, whole_files: Sequence[tuple[str, str, Path]]) -> None:
        """Blocking: loads the cache and the manifests of the whole files (digest, alias, path) we have,
        building (hashing) those not built before."""
        for entry in self.cache.load():
            self._index_cached(entry)
        for digest, alias, path in whole_files:
            self.add_whole_file(digest, alias, path)

    def add_whole_file(self, digest: str, alias: str, path: Path) -> None:
        if digest in self._files:
            return
        stored = self._manifest_dir / f"{digest}.manifest"
        manifest = None
        try:
            manifest = decode_manifest(stored.read_bytes(), digest)
            if manifest.file_size != path.stat().st_size:
                manifest = None
        except (OSError, ManifestError):
            manifest = None
        if manifest is None:
            manifest = build_manifest(path, digest, alias)
            self._manifest_dir.mkdir(parents=True, exist_ok=True)
            stored.write_bytes(manifest.encode())
        data = manifest.encode()
        self._files[digest] = (path, manifest, data)

        def read(piece, path=path):  # noqa: ANN001
            with open(path, "rb") as f:
                f.seek(piece.offset)
                return f.read(piece.length)

        self._served[digest] = Served(manifest, data, lambda i: True, read, tuple(manifest.all_pieces()))

    def _index_cached(self, entry: CachedModel) -> None:
        if entry.digest in self._files:
            return
        m = entry.manifest
        self._served[entry.digest] = Served(m, m.encode(), entry.has, entry.read, tuple(m.all_pieces()))

    def lookup(self, digest: str) -> Served | None:
        return self._served.get(digest)

    def held(self) -> list[Held]:
        out = []
        for digest, (path, manifest, data) in self._files.items():
            n = _n_layers(manifest)
            out.append(Held(digest, manifest.alias, path, 0, n, n, hashlib.sha256(data).hexdigest(), False))
        for entry in self.cache.entries():
            if entry.digest in self._files or (r := entry.held_range()) is None:
                continue
            n = _n_layers(entry.manifest)
            out.append(Held(entry.digest, entry.alias, entry.path, r[0], r[1], n, entry.manifest.manifest_id, True))
        return out

    def snapshot(self) -> dict:
        return {
            "fetching": [p.snapshot() for p in self.fetching.values()],
            "fetched_bytes": dict(self.fetched_bytes),
            "last_fetch": dict(self.last_fetch),
            "cache": [{"digest": e.digest, "alias": e.alias, "ranges": [list(r) for r in e.ranges],
                       "complete": e.complete, "disk_bytes": e.disk_bytes()} for e in self.cache.entries()],
            "cache_disk_bytes": sum(e.disk_bytes() for e in self.cache.entries()),
            "disk_budget_bytes": self.cache.disk_budget_bytes,
            "serve_streams": self.serve_streams,
            "rejected": self.rejects.snapshot(),
        }

    # --- fetching -----------------------------------------------------------------------------------
    async def ensure_range(self, digest: str, start: int, end: int, adverts: Sequence[NodeAdvert],
                           alias: str = "") -> Path:
        """The cache file holding layers [start, end) of `digest`, fetched from members if missing.
        A whole file the node has is returned as it is."""
        if digest in self._files:
            return self._files[digest][0]
        async with self._locks.setdefault(digest, asyncio.Lock()):
            return await self._fetch(digest, adverts, alias, (start, end))

    async def pull(self, digest: str, adverts: Sequence[NodeAdvert], alias: str = "") -> Path:
        """The whole file in the cache, its sha256 checked against the digest."""
        if digest in self._files:
            return self._files[digest][0]
        async with self._locks.setdefault(digest, asyncio.Lock()):
            path = await self._fetch(digest, adverts, alias, None)
            if await asyncio.to_thread(_sha256, path) != digest:  # the binding, end to end
                entry = self.cache.get(digest)
                if entry is not None:
                    entry.have[:] = bytes(len(entry.have))
                    entry.ranges.clear()
                    self.cache.discard_partial(entry)
                raise WeightsError(f"the pulled file's sha256 is not {digest[:12]}: discarded")
            return path

    async def _fetch(self, digest: str, adverts: Sequence[NodeAdvert], alias: str, span: tuple[int, int] | None) -> Path:
        entry = self.cache.get(digest)
        if entry is not None and (span is None and entry.complete
                                  or span is not None and entry.has_range(*span, _n_layers(entry.manifest))):
            self.last_fetch[digest] = {"bytes": 0, "seconds": 0.0, "sources": []}
            return entry.path
        offers = _offers(digest, adverts, self._node_id)
        if not offers:
            raise WeightsError(f"no member advertises the bytes of model {digest[:12]}")
        manifest_id = entry.manifest.manifest_id if entry is not None else _usual_manifest(offers)
        offers = [o for o in offers if o[1].manifest == manifest_id]
        if entry is None:
            manifest = await self._manifest(digest, manifest_id, offers)
            entry = await asyncio.to_thread(self.cache.open, manifest, alias or manifest.alias)
            self._index_cached(entry)
        manifest = entry.manifest
        n_layers = _n_layers(manifest)
        if span is not None and not 0 <= span[0] < span[1] <= n_layers:
            raise WeightsError(f"bad layer range [{span[0]}, {span[1]}) of {n_layers}")
        wanted = manifest.all_pieces() if span is None else range_pieces(manifest, *span, n_layers)
        missing = entry.missing(wanted)
        try:
            self.cache.reserve(entry, wanted)
        except CacheError as e:
            await asyncio.to_thread(self.cache.discard_partial, entry)
            if self.cache.get(digest) is None:
                self._served.pop(digest, None)
            raise WeightsError(e.strerror or str(e)) from None
        what = f"{entry.alias or digest[:12]} " + ("whole" if span is None else f"layers {span[0]}-{span[1]}")
        progress = FetchProgress(what, sum(p.length for p in missing))
        sources = [GrpcSource(self._channels, a.node_id, digest, _has(manifest, f, n_layers), max(1, a.serve_streams))
                   for a, f in offers]
        self.fetching[digest] = progress
        logger = asyncio.create_task(_log_progress(progress))
        t0 = time.monotonic()
        header = {p.index for p in manifest.pieces_of(manifest.segments[0])} if manifest.segments[0].name == HEADER else set()
        try:
            first = [p for p in missing if p.index in header]
            if first:  # the header first: its tensor table must agree with the manifest
                await fetch_pieces(manifest, first, sources, entry.write, progress, self._bad)
                await asyncio.to_thread(entry.flush)  # mtime back: the index parsed now serves the loads too
                await asyncio.to_thread(check_header_matches, manifest, entry.path, manifest.file_size)
            rest = [p for p in missing if p.index not in header]
            await fetch_pieces(manifest, rest, sources, entry.write, progress, self._bad)
        except CacheError as e:
            await asyncio.to_thread(self.cache.discard_partial, entry)
            if self.cache.get(digest) is None:
                self._served.pop(digest, None)
            raise WeightsError(e.strerror or str(e)) from None
        except (FetchError, ManifestError) as e:
            await asyncio.to_thread(entry.flush)  # what was verified stays: a later fetch resumes there
            raise WeightsError(f"fetching {what}: {e}") from None
        finally:
            logger.cancel()
            self.fetching.pop(digest, None)
            self.fetched_bytes[digest] = self.fetched_bytes.get(digest, 0) + progress.done_bytes
        await asyncio.to_thread(entry.add_range, *(span or (0, n_layers)))
        seconds = time.monotonic() - t0
        self.last_fetch[digest] = {"bytes": progress.done_bytes, "seconds": round(seconds, 3),
                                   "sources": sorted(progress.by_source), "bytes_by_source": dict(progress.by_source)}
        log.info("fetched %s: %.1f MiB in %.2f s (%.1f MiB/s) from %d source(s)", what, progress.done_bytes / 2**20,
                 seconds, progress.done_bytes / 2**20 / max(seconds, 1e-9), len(progress.by_source))
        self._on_change()
        return entry.path

    async def _manifest(self, digest: str, manifest_id: str, offers: list[tuple[NodeAdvert, FileAdvert]]) -> Manifest:
        for advert, _ in offers:
            try:
                return await fetch_manifest(self._channels, advert.node_id, digest, manifest_id)
            except ManifestError as e:
                self._bad("bad_manifest", advert.node_id, str(e))
            except (TimeoutError, ConnectionError, OSError) as e:
                self._bad("source_failed", advert.node_id, str(e)[:200])
        raise WeightsError(f"no member sent a good manifest of model {digest[:12]}")

    def _bad(self, reason: str, node_id: str, detail: str) -> None:
        self.rejects.reject(reason, node_id[:12], detail)


def _offers(digest: str, adverts: Sequence[NodeAdvert], me: str) -> list[tuple[NodeAdvert, FileAdvert]]:
    """Members advertising bytes of `digest` with a manifest id and a serve cap, whole files first."""
    out = [(a, f) for a in adverts if a.node_id != me and a.serve_streams > 0 and a.addresses.grpc
           for f in a.files if f.digest == digest and f.manifest]
    return sorted(out, key=lambda af: (not af[1].whole_file, af[0].node_id))


def _usual_manifest(offers: list[tuple[NodeAdvert, FileAdvert]]) -> str:
    """The manifest id most holders of the whole file advertise (whole-file holders built it themselves)."""
    counts: dict[str, tuple[int, int]] = {}
    for _, f in offers:
        whole, n = counts.get(f.manifest, (0, 0))
        counts[f.manifest] = (whole + f.whole_file, n + 1)
    return max(counts, key=lambda m: counts[m])


def _has(manifest: Manifest, f: FileAdvert, n_layers: int) -> Callable[[int], bool]:
    if f.whole_file:
        return lambda i: True
    held = {p.index for p in range_pieces(manifest, f.start, f.held_end, n_layers)}
    return held.__contains__


def _n_layers(manifest: Manifest) -> int:
    from shard.manifest import n_layers_of

    return n_layers_of(manifest.segments)


async def _log_progress(progress: FetchProgress) -> None:
    while True:
        await asyncio.sleep(PROGRESS_LOG_S)
        s = progress.snapshot()
        log.info("fetching %s: %.1f of %.1f MiB, %.1f MiB/s, sources %s", s["what"], s["done_bytes"] / 2**20,
                 s["total_bytes"] / 2**20, s["rate_bytes_s"] / 2**20, ",".join(x[:8] for x in s["sources"]) or "-")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()
