"""The weights cache in a node's data dir: fetched pieces of GGUFs, as loadable GGUF files.

`<data dir>/weights/<digest>.gguf` is a sparse file of the model's full size: the header (metadata,
tokenizer, tensor table) and every fetched tensor at its own offset, holes elsewhere. `shard.gguf_index`
and the torch loader read it as they read the original, touching only the tensors of the range they
load; after a whole pull it is byte for byte the original. Beside it, `<digest>.manifest` (the
manifest's bytes) and `<digest>.json` (the alias, the layer ranges complete, and a bitmap of the pieces
written, each verified before it was written) let a restarted node resume or serve without fetching.

Disk use is counted in allocated blocks, within `--disk-budget`. Names come from digests only: nothing
a peer sends becomes a path.
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from shard.manifest import Manifest, ManifestError, Piece, decode_manifest, range_pieces

_DIGEST = re.compile(r"[0-9a-f]{64}")
FLUSH_EVERY = 32  # pieces between writes of the bitmap (a restart re-fetches at most these)


class CacheError(OSError):
    """The cache cannot take what was asked: over --disk-budget, or the disk is full (one line)."""


@dataclass
class CachedModel:
    """One model's entry; its methods block (file I/O) and are safe from several threads."""

    dir: Path
    manifest: Manifest
    alias: str
    ranges: list[tuple[int, int]] = field(default_factory=list)  # complete layer ranges, merged
    have: bytearray = field(default_factory=bytearray)  # one bit a piece
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _unflushed: int = 0
    # the file's mtime, put back after each flush: the GGUF index cache (shard.gguf_index) is keyed by
    # (path, size, mtime), and the header, hence the index, never changes once written; without this
    # every write would make the next reader re-parse the metadata (seconds for a large vocabulary)
    mtime_ns: int = 0

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def path(self) -> Path:
        return self.dir / f"{self.digest}.gguf"

    def has(self, index: int) -> bool:
        return 0 <= index < self.manifest.n_pieces and bool(self.have[index >> 3] & (1 << (index & 7)))

    def missing(self, pieces: list[Piece]) -> list[Piece]:
        return [p for p in pieces if not self.has(p.index)]

    @property
    def complete(self) -> bool:
        return all(self.has(i) for i in range(self.manifest.n_pieces))

    def has_range(self, start: int, end: int, n_layers: int) -> bool:
        return not self.missing(range_pieces(self.manifest, start, end, n_layers))

    def write(self, piece: Piece, data: bytes) -> None:
        """Writes a piece the caller verified against the manifest."""
        if len(data) != piece.length:
            raise ValueError("piece has the wrong length")
        fd = os.open(self.path, os.O_WRONLY)
        try:
            view, offset = memoryview(data), piece.offset
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheError(e.errno, f"the disk is full writing {self.path.name}") from None
            raise
        finally:
            os.close(fd)
        with self._lock:
            self.have[piece.index >> 3] |= 1 << (piece.index & 7)
            self._unflushed += 1
            flush = self._unflushed >= FLUSH_EVERY
        if flush:
            self.flush()

    def read(self, piece: Piece) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(piece.offset)
            return f.read(piece.length)

    def add_range(self, start: int, end: int) -> None:
        with self._lock:
            self.ranges = merge_ranges([*self.ranges, (start, end)])
        self.flush()

    def held_range(self) -> tuple[int, int] | None:
        """The largest complete range (the one advertised)."""
        return max(self.ranges, key=lambda r: r[1] - r[0], default=None)

    def flush(self) -> None:
        """Data first, then the bitmap that claims it (a crash never claims unwritten pieces)."""
        with self._lock:
            state = {"alias": self.alias, "ranges": [list(r) for r in self.ranges], "have": self.have.hex()}
            self._unflushed = 0
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        if self.mtime_ns:
            os.utime(self.path, ns=(self.mtime_ns, self.mtime_ns))
        _write_atomic(self.dir / f"{self.digest}.json", json.dumps(state).encode())

    def disk_bytes(self) -> int:
        return sum(_allocated(self.dir / f"{self.digest}{ext}") for ext in (".gguf", ".manifest", ".json"))


class WeightCache:
    def __init__(self, data_dir: Path, disk_budget_bytes: int | None = None) -> None:
        self.dir = Path(data_dir) / "weights"
        self.disk_budget_bytes = disk_budget_bytes
        self._entries: dict[str, CachedModel] = {}
        self._lock = threading.Lock()

    def load(self) -> list[CachedModel]:
        """Blocking: the entries on disk (a bad or foreign file is skipped, never trusted)."""
        if not self.dir.is_dir():
            return []
        for manifest_path in sorted(self.dir.glob("*.manifest")):
            digest = manifest_path.stem
            if not _DIGEST.fullmatch(digest) or digest in self._entries:
                continue
            try:
                manifest = decode_manifest(manifest_path.read_bytes(), digest)
                state = json.loads((self.dir / f"{digest}.json").read_text())
                have = bytearray.fromhex(state["have"])
                ranges = [(int(a), int(b)) for a, b in state["ranges"]]
                alias = str(state.get("alias", ""))[:64]
            except (OSError, ValueError, KeyError, TypeError, ManifestError):
                continue
            path = self.dir / f"{digest}.gguf"
            if len(have) != (manifest.n_pieces + 7) // 8 or not path.is_file() or path.stat().st_size != manifest.file_size:
                continue
            self._entries[digest] = CachedModel(self.dir, manifest, alias, ranges, have, mtime_ns=path.stat().st_mtime_ns)
        return list(self._entries.values())

    def entries(self) -> list[CachedModel]:
        with self._lock:
            return list(self._entries.values())

    def get(self, digest: str) -> CachedModel | None:
        with self._lock:
            return self._entries.get(digest)

    def used_bytes(self) -> int:
        return sum(e.disk_bytes() for e in self.entries())

    def open(self, manifest: Manifest, alias: str) -> CachedModel:
        """Blocking: the entry for `manifest`, created (a sparse file of the full size) if new."""
        with self._lock:
            entry = self._entries.get(manifest.digest)
            if entry is not None:
                return entry
            self.dir.mkdir(parents=True, exist_ok=True)
            entry = CachedModel(self.dir, manifest, alias, [], bytearray((manifest.n_pieces + 7) // 8))
            try:
                with open(entry.path, "wb") as f:
                    f.truncate(manifest.file_size)
                entry.mtime_ns = entry.path.stat().st_mtime_ns
                _write_atomic(self.dir / f"{manifest.digest}.manifest", manifest.encode())
                entry.flush()
            except OSError as e:
                self._remove_files(manifest.digest)
                raise CacheError(e.errno or errno.EIO, f"cannot create the cache file: {e.strerror or e}") from None
            self._entries[manifest.digest] = entry
            return entry

    def reserve(self, entry: CachedModel, pieces: list[Piece]) -> int:
        """Raises CacheError when writing the missing `pieces` would pass --disk-budget; returns their bytes."""
        need = sum(p.length for p in entry.missing(pieces))
        if self.disk_budget_bytes is not None and self.used_bytes() + need > self.disk_budget_bytes:
            left = max(0, self.disk_budget_bytes - self.used_bytes())
            raise CacheError(errno.ENOSPC, f"{entry.alias or entry.digest[:12]} needs {need / 2**20:.0f} MiB of disk "
                             f"but only {left / 2**20:.0f} MiB of --disk-budget {self.disk_budget_bytes} bytes is left")
        return need

    def discard_partial(self, entry: CachedModel) -> None:
        """After a failed write (disk full): an entry with no complete range goes, files and all."""
        if entry.ranges:
            entry.flush()
            return
        with self._lock:
            self._entries.pop(entry.digest, None)
        self._remove_files(entry.digest)

    def _remove_files(self, digest: str) -> None:
        for ext in (".gguf", ".manifest", ".json"):
            (self.dir / f"{digest}{ext}").unlink(missing_ok=True)


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _allocated(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
