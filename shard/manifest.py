"""The content manifest of a GGUF: its segments (the metadata header, then each tensor with the padding
after it) and the sha256 of every piece, so that any part of the file can be verified on its own.

The segments tile the file: `[0, data_start)` is the header (metadata, tokenizer, tensor table), then
every tensor in file order runs from its offset to the next tensor's offset (or the end of the file).
Each segment is cut into pieces of `piece_bytes` (the last one shorter); the manifest lists the
sha256 of every piece in that order. A range of layers needs the header and its tensors' segments,
so the bytes fetched for a range are exactly the header plus those tensors (and their <= 31 bytes of
alignment padding).

Binding (docs/weights.md): the model digest is the sha256 of the whole file; the manifest id is the
sha256 of the manifest's canonical encoding, which names that digest. A node holding the whole file
builds the manifest from it (deterministically, so every holder builds the same bytes) and advertises
the manifest id next to the digest in its signed advert. A receiver takes a manifest only if its
bytes hash to the id its sources advertise and it names the wanted digest, and checks that the
header (verified by its piece hashes) lists the same tensors at the same offsets. A whole pull then
checks the file's sha256 against the digest end to end.

Pure: bytes in, bytes out; nothing here touches the network, and nothing a peer sends names a path.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import msgpack

VERSION = 1
PIECE_BYTES = 1 << 20  # a piece travels as one frame, well under the data plane's 8 MiB message cap
MAX_SEGMENTS = 1 << 16  # a 70B GGUF has about 1,000 tensors
MAX_PIECES = 1 << 22  # 4 TiB at 1 MiB pieces
MAX_MANIFEST_BYTES = 160 << 20  # the header (a tokenizer of a large vocabulary) plus 32 bytes a piece
MAX_NAME_CHARS = 256
HEADER = ""  # the header segment's name
_DIGEST = re.compile(r"[0-9a-f]{64}")
_BLOCK = re.compile(r"blk\.(\d+)\.")


class ManifestError(ValueError):
    """A manifest that does not decode, does not tile its file, or does not match what it claims."""


@dataclass(frozen=True, slots=True)
class Segment:
    name: str  # HEADER or a tensor name
    offset: int  # in the file
    length: int  # up to the next segment
    first_piece: int  # index of its first piece in the manifest's piece list

    def n_pieces(self, piece_bytes: int) -> int:
        return max(1, -(-self.length // piece_bytes))


@dataclass(frozen=True, slots=True)
class Piece:
    index: int
    offset: int  # in the file
    length: int


@dataclass(frozen=True, slots=True)
class Manifest:
    digest: str  # sha256 of the whole GGUF
    file_size: int
    piece_bytes: int
    segments: tuple[Segment, ...]
    hashes: bytes  # 32 bytes per piece, in segment order
    alias: str = ""  # the holder's name for the model (advisory; a known alias wins)

    @property
    def n_pieces(self) -> int:
        return len(self.hashes) // 32

    def piece_hash(self, index: int) -> bytes:
        return self.hashes[32 * index : 32 * index + 32]

    def segment(self, name: str) -> Segment | None:
        return self._by_name().get(name)

    def _by_name(self) -> dict[str, Segment]:
        return {s.name: s for s in self.segments}

    def pieces_of(self, seg: Segment) -> list[Piece]:
        out = []
        for k in range(seg.n_pieces(self.piece_bytes)):
            off = k * self.piece_bytes
            out.append(Piece(seg.first_piece + k, seg.offset + off, min(self.piece_bytes, seg.length - off)))
        return out

    def all_pieces(self) -> list[Piece]:
        return [p for s in self.segments for p in self.pieces_of(s)]

    def encode(self) -> bytes:
        """The canonical bytes (their sha256 is the manifest id)."""
        return msgpack.packb(
            {"v": VERSION, "digest": self.digest, "size": self.file_size, "piece": self.piece_bytes,
             "alias": self.alias, "segments": [[s.name, s.offset, s.length] for s in self.segments],
             "hashes": self.hashes},
            use_bin_type=True,
        )

    @property
    def manifest_id(self) -> str:
        return hashlib.sha256(self.encode()).hexdigest()

    def check_piece(self, index: int, data: bytes) -> bool:
        return hashlib.sha256(data).digest() == self.piece_hash(index)


def n_layers_of(segments: Iterable[Segment]) -> int:
    return 1 + max((int(m.group(1)) for s in segments if (m := _BLOCK.match(s.name))), default=-1)


def range_segments(manifest: Manifest, start: int, end: int, n_layers: int) -> list[Segment]:
    """What layers [start, end) of an `n_layers` model need: the header, their blocks' tensors, the
    token embedding on the first stage, the output norm and head on the last (the embedding again
    when the head is tied), and every tensor outside the blocks that is neither (rope_freqs)."""
    out = []
    names = {s.name for s in manifest.segments}
    tied = "output.weight" not in names
    for s in manifest.segments:
        m = _BLOCK.match(s.name)
        if s.name == HEADER:
            keep = True
        elif m is not None:
            keep = start <= int(m.group(1)) < end
        elif s.name == "token_embd.weight":
            keep = start == 0 or (end == n_layers and tied)
        elif s.name in ("output.weight", "output_norm.weight"):
            keep = end == n_layers
        else:
            keep = True
        if keep:
            out.append(s)
    return out


def range_pieces(manifest: Manifest, start: int, end: int, n_layers: int) -> list[Piece]:
    return [p for s in range_segments(manifest, start, end, n_layers) for p in manifest.pieces_of(s)]


def layout(header_bytes: int, tensors: Iterable[tuple[str, int]], file_size: int,
           piece_bytes: int = PIECE_BYTES) -> list[Segment]:
    """Segments tiling a file: the header, then each (name, absolute offset) up to the next one."""
    ordered = sorted(tensors, key=lambda t: t[1])
    starts = [(HEADER, 0)] + ordered
    segments, first = [], 0
    for i, (name, offset) in enumerate(starts):
        nxt = starts[i + 1][1] if i + 1 < len(starts) else file_size
        if name != HEADER and i == 1 and offset != header_bytes:
            raise ManifestError(f"first tensor at {offset}, header ends at {header_bytes}")
        if nxt < offset or (name == HEADER and header_bytes > nxt):
            raise ManifestError(f"segment {name!r} overlaps the next")
        seg = Segment(name, offset, (header_bytes if name == HEADER else nxt - offset), first)
        segments.append(seg)
        first += seg.n_pieces(piece_bytes)
    return segments


def gguf_layout(path: str | Path, piece_bytes: int = PIECE_BYTES) -> list[Segment]:
    """The segments of a GGUF on disk, from its tensor table (shard.gguf_index)."""
    from shard.gguf_index import open_index

    index = open_index(path)
    size = Path(path).stat().st_size
    tensors = [(t.name, t.offset) for t in index.tensors.values()]
    header = min((o for _, o in tensors), default=size)
    return layout(header, tensors, size, piece_bytes)


def build_manifest(path: str | Path, digest: str, alias: str = "", piece_bytes: int = PIECE_BYTES) -> Manifest:
    """Blocking: reads the whole file once and hashes every piece (about 1 GB/s)."""
    segments = gguf_layout(path, piece_bytes)
    h = bytearray()
    with open(path, "rb") as f:
        for seg in segments:
            f.seek(seg.offset)
            left = seg.length
            for _ in range(seg.n_pieces(piece_bytes)):
                n = min(piece_bytes, left)
                h += hashlib.sha256(f.read(n)).digest()
                left -= n
    return Manifest(digest, Path(path).stat().st_size, piece_bytes, tuple(segments), bytes(h), alias[:64])


def decode_manifest(data: bytes, digest: str) -> Manifest:
    """A peer's manifest, checked: size caps, types, segments that tile the file, one hash a piece,
    and the digest it names equal to the one asked for."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest of {len(data)} bytes is over the {MAX_MANIFEST_BYTES} cap")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_MANIFEST_BYTES,
                              max_str_len=1 << 16, max_array_len=MAX_SEGMENTS, max_map_len=16, max_ext_len=0)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise ManifestError(f"malformed manifest: {e}") from None
    if not isinstance(obj, dict) or obj.get("v") != VERSION:
        raise ManifestError("not a version 1 manifest")
    d, size, piece, alias, segs, hashes = (obj.get(k) for k in ("digest", "size", "piece", "alias", "segments", "hashes"))
    size = size if isinstance(size, int) and _is_int(size) else -1
    piece = piece if isinstance(piece, int) and _is_int(piece) else -1
    if d != digest or not isinstance(d, str) or not _DIGEST.fullmatch(d):
        raise ManifestError("manifest names another model")
    if not (size >= 0 and 4096 <= piece <= 4 << 20 and isinstance(alias, str)
            and len(alias) <= 64 and isinstance(segs, list) and 1 <= len(segs) <= MAX_SEGMENTS
            and isinstance(hashes, bytes) and len(hashes) % 32 == 0 and len(hashes) // 32 <= MAX_PIECES):
        raise ManifestError("manifest fields have the wrong types or sizes")
    segments, first, offset, seen = [], 0, 0, set()
    for i, s in enumerate(segs):
        if not (isinstance(s, list) and len(s) == 3 and isinstance(s[0], str) and len(s[0]) <= MAX_NAME_CHARS
                and _is_int(s[1]) and _is_int(s[2])):
            raise ManifestError("bad segment")
        name, off, length = s
        if (i == 0) != (name == HEADER) or name in seen or off != offset or (length == 0 and name == HEADER):
            raise ManifestError("segments do not tile the file")
        seen.add(name)
        seg = Segment(name, off, length, first)
        segments.append(seg)
        first += seg.n_pieces(piece)
        offset += length
    if offset != size or first != len(hashes) // 32:
        raise ManifestError("segments and hashes do not cover the file")
    return Manifest(d, size, piece, tuple(segments), hashes, alias)


def check_header_matches(manifest: Manifest, header: bytes | Path, file_size: int) -> None:
    """The verified header's own tensor table must give the manifest's segments (names and offsets)."""
    import tempfile

    if isinstance(header, Path):
        segments = gguf_layout(header, manifest.piece_bytes)
    else:  # parse a header alone: a file of the full size with only the header written (sparse)
        with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
            f.write(header)
            f.truncate(file_size)
            f.flush()
            segments = gguf_layout(f.name, manifest.piece_bytes)
    if [(s.name, s.offset, s.length) for s in segments] != [(s.name, s.offset, s.length) for s in manifest.segments]:
        raise ManifestError("the header's tensor table does not match the manifest")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 50
