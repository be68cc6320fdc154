"""A GGUF's header (metadata and tensor table) read in one pass, big arrays kept as arrays.

`gguf.GGUFReader` makes a numpy view of every array element (two of every string): 2 s for SmolLM2's
49k-token vocabulary and merges, 12 s for Gemma 3's 262k, at every start of a torch-engine node and
every time a test or a fetched range reads a header. Here scalars and strings become Python values,
numeric arrays one numpy array each, and string arrays an offset table that decodes on demand; the
same file costs 0.1-0.3 s (docs/dependencies.md says why this is not gguf-py).

The header can be a peer's input (the first piece of a fetched model, shard/manifest.py), so nothing
in it is trusted: every count, length, type and offset is checked against caps and against the bytes
that are there before it is used, and any malformation is one `GGUFHeaderError`.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from shard.config import ModelConfigError

GGUF_MAGIC = b"GGUF"
VERSIONS = (2, 3)  # what gguf-py and llama.cpp read
MAX_KV = 1 << 16  # metadata keys (real files have < 100)
MAX_TENSORS = 1 << 16  # as shard.manifest.MAX_SEGMENTS: a 70B GGUF has about 1,000
MAX_ARRAY = 1 << 22  # elements of one array: vocabularies and merges are < 300k
MAX_KEY_BYTES = 1 << 16
MAX_NAME_BYTES = 256  # tensor names: ggml's own limit is 64; shard.manifest.MAX_NAME_CHARS
MAX_DIMS = 4  # GGML_MAX_DIMS
_SCALARS = {  # value type -> struct format (little-endian), as numpy reads it too
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<B", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GGUFHeaderError(ModelConfigError):
    """The file is not a well-formed GGUF (bad magic, truncated, over a cap, inconsistent)."""


class StringArray(Sequence[str]):
    """A GGUF array of strings: its bytes and where each string starts, decoded (UTF-8) when read."""

    __slots__ = ("_data", "_starts", "_ends")

    def __init__(self, data: bytes, starts: list[int], ends: list[int]) -> None:
        self._data, self._starts, self._ends = data, starts, ends

    def __len__(self) -> int:
        return len(self._starts)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._data[self._starts[i] : self._ends[i]].decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        data = self._data
        return (data[s:e].decode("utf-8") for s, e in zip(self._starts, self._ends, strict=True))


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    type_name: str  # GGUF type: "Q4_K", "F32", ...
    shape: tuple[int, ...]  # as gguf lists it: fastest dimension first
    n_elements: int
    n_bytes: int
    offset: int  # of its data in the file

    @property
    def qtype(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.type_name]


@dataclass(frozen=True, slots=True)
class GGUFHeader:
    # key -> int | float | bool | str | np.ndarray (numeric arrays) | StringArray
    fields: dict[str, object]
    types: dict[str, tuple[GGUFValueType, ...]]  # key -> (type,) or (ARRAY, element type)
    tensors: dict[str, TensorInfo]  # in file order
    data_offset: int  # where tensor data starts (tensor offsets are absolute here)
    file_size: int


def read_header(path: str | Path) -> GGUFHeader:
    """Parses the header of the GGUF at `path`; `GGUFHeaderError` if it is malformed."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise GGUFHeaderError(f"{path}: {size} bytes is too short for a GGUF")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            try:
                return _Parser(mm, size).header()
            except (UnicodeDecodeError, ValueError, struct.error) as e:
                if isinstance(e, GGUFHeaderError):
                    raise
                raise GGUFHeaderError(f"{path}: malformed GGUF header ({e})") from None


class _Parser:
    """One pass over the mapped bytes; `self.pos` only moves forward, each read checked against the end."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, n: int) -> int:
        """Reserves n bytes at pos and returns where they start."""
        start = self.pos
        if n < 0 or start + n > self.size:
            raise GGUFHeaderError(f"header runs past the end of the file at byte {start} (+{n})")
        self.pos = start + n
        return start

    def u32(self) -> int:
        return _U32.unpack_from(self.buf, self.take(4))[0]

    def u64(self) -> int:
        return _U64.unpack_from(self.buf, self.take(8))[0]

    def string(self, cap: int) -> str:
        n = self.u64()
        if n > cap:
            raise GGUFHeaderError(f"string of {n} bytes at byte {self.pos} is over the {cap}-byte cap")
        start = self.take(n)
        return self.buf[start : start + n].decode("utf-8")

    def value_type(self) -> GGUFValueType:
        raw = self.u32()
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise GGUFHeaderError(f"unknown value type {raw} at byte {self.pos - 4}") from None

    def value(self, vtype: GGUFValueType) -> tuple[object, tuple[GGUFValueType, ...]]:
        if vtype == GGUFValueType.STRING:
            return self.string(self.size), (vtype,)
        if vtype != GGUFValueType.ARRAY:
            fmt = struct.Struct(_SCALARS[vtype])
            item = fmt.unpack_from(self.buf, self.take(fmt.size))[0]
            return (bool(item) if vtype == GGUFValueType.BOOL else item), (vtype,)
        sub = self.value_type()
        n = self.u64()
        if n > MAX_ARRAY:
            raise GGUFHeaderError(f"array of {n} elements is over the {MAX_ARRAY} cap")
        if sub == GGUFValueType.STRING:
            return self.strings(n), (vtype, sub)
        if sub == GGUFValueType.ARRAY:
            raise GGUFHeaderError("nested arrays are not supported")  # nor by llama.cpp
        dtype = np.dtype(_SCALARS[sub])
        start = self.take(n * dtype.itemsize)
        arr = np.frombuffer(self.buf[start : self.pos], dtype)  # of a copy: the map closes after the parse
        return (arr.astype(bool) if sub == GGUFValueType.BOOL else arr), (vtype, sub)

    def strings(self, n: int) -> StringArray:
        """n strings: one pass over their lengths, a copy of their bytes; decoded when read."""
        first = self.pos
        starts: list[int] = []
        ends: list[int] = []
        unpack, buf, pos, size = _U64.unpack_from, self.buf, self.pos, self.size
        add_start, add_end = starts.append, ends.append
        for _ in range(n):  # the hot loop of a 262k vocabulary: locals only
            if pos + 8 > size:
                raise GGUFHeaderError(f"string array runs past the end of the file at byte {pos}")
            length = unpack(buf, pos)[0]
            pos += 8
            if length > size - pos:
                raise GGUFHeaderError(f"string of {length} bytes at byte {pos} runs past the end of the file")
            add_start(pos - first)
            pos += length
            add_end(pos - first)
        self.pos = pos
        return StringArray(buf[first:pos], starts, ends)

    def header(self) -> GGUFHeader:
        if self.buf[:4] != GGUF_MAGIC:
            raise GGUFHeaderError("not a GGUF file (bad magic)")
        self.take(4)
        version = self.u32()
        if version not in VERSIONS:
            raise GGUFHeaderError(f"GGUF version {version} (big-endian or unknown); readable: {VERSIONS}")
        n_tensors, n_kv = self.u64(), self.u64()
        if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
            raise GGUFHeaderError(f"{n_tensors} tensors and {n_kv} keys: over the caps ({MAX_TENSORS}, {MAX_KV})")
        fields: dict[str, object] = {}
        types: dict[str, tuple[GGUFValueType, ...]] = {}
        for _ in range(n_kv):
            key = self.string(MAX_KEY_BYTES)
            if key in fields:
                raise GGUFHeaderError(f"duplicate key {key!r}")
            fields[key], types[key] = self.value(self.value_type())
        raw = [self.tensor_info() for _ in range(n_tensors)]
        alignment = fields.get("general.alignment", 32)
        if "general.alignment" in types and types["general.alignment"] != (GGUFValueType.UINT32,):
            raise GGUFHeaderError("general.alignment is not a UINT32")
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFHeaderError(f"alignment {alignment!r} is not a power of two")
        data_offset = -(-self.pos // alignment) * alignment
        tensors: dict[str, TensorInfo] = {}
        for name, qtype, dims, rel_offset in raw:
            if name in tensors:
                raise GGUFHeaderError(f"duplicate tensor {name!r}")
            block, type_bytes = GGML_QUANT_SIZES[qtype]
            n_elements = int(np.prod(dims, dtype=object)) if dims else 1
            n_bytes = n_elements * type_bytes // block  # as gguf-py computes it
            if n_bytes >= 1 << 62 or rel_offset >= 1 << 62:
                raise GGUFHeaderError(f"tensor {name} is impossibly large or far")
            tensors[name] = TensorInfo(name, qtype.name, dims, n_elements, n_bytes, data_offset + rel_offset)
        return GGUFHeader(fields, types, tensors, data_offset, self.size)

    def tensor_info(self) -> tuple[str, GGMLQuantizationType, tuple[int, ...], int]:
        name = self.string(MAX_NAME_BYTES)
        n_dims = self.u32()
        if n_dims > MAX_DIMS:
            raise GGUFHeaderError(f"tensor {name} has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = tuple(self.u64() for _ in range(n_dims))
        if any(d >= 1 << 62 for d in dims):
            raise GGUFHeaderError(f"tensor {name} has a dimension over 2^62")
        raw_type = self.u32()
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise GGUFHeaderError(f"tensor {name} has unknown type {raw_type}") from None
        return name, qtype, dims, self.u64()
