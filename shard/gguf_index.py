"""What the engine keeps of a GGUF: its model config, its tensor table, and a memory map of its bytes.

`gguf.GGUFReader` turns every metadata value into numpy objects: for SmolLM2's 49k-token vocabulary
that is ~140 MB of Python heap (far more for Gemma's 262k), held for as long as the reader lives. The
index parses once, keeps the few facts the engine needs, and lets the reader go; tensor bytes are read
through a plain `np.memmap`, so only the pages of the tensors used become resident.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from shard.config import ModelConfig, ModelConfigError, read_config


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    type_name: str  # GGUF type: "Q4_K", "F32", ...
    shape: tuple[int, ...]  # as gguf lists it: fastest dimension first
    n_elements: int
    n_bytes: int
    offset: int  # of its data in the file

    @property
    def qtype(self) -> gguf.GGMLQuantizationType:
        return gguf.GGMLQuantizationType[self.type_name]


@dataclass(frozen=True, slots=True)
class GGUFIndex:
    path: str
    config: ModelConfig | None  # None when the architecture is not one the engine runs
    config_error: str  # why config is None
    tensors: dict[str, TensorInfo]
    _map: np.memmap

    def model_config(self) -> ModelConfig:
        if self.config is None:
            raise ModelConfigError(self.config_error)
        return self.config

    def data(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes: uint8 [n_bytes], a view of the map (nothing is read until used)."""
        return self._map[t.offset : t.offset + t.n_bytes]


def open_index(path: str | Path) -> GGUFIndex:
    """The index of a GGUF, shared per file version (parsing costs seconds for big vocabularies)."""
    stat = Path(path).stat()
    return _cached_index(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _cached_index(path: str, size: int, mtime_ns: int) -> GGUFIndex:
    del mtime_ns  # part of the cache key only: a rewritten file gets a fresh index
    reader = gguf.GGUFReader(path, "r")
    config, error = None, ""
    try:
        config = read_config(reader)
    except ModelConfigError as e:
        error = str(e)
    tensors = {}
    for t in reader.tensors:
        info = TensorInfo(
            name=t.name,
            type_name=t.tensor_type.name,
            shape=tuple(int(d) for d in t.shape),
            n_elements=int(t.n_elements),
            n_bytes=int(t.n_bytes),
            offset=int(t.data_offset),
        )
        if info.offset + info.n_bytes > size:
            raise ModelConfigError(f"tensor {t.name} runs past the end of the file (truncated?)")
        tensors[t.name] = info
    return GGUFIndex(path, config, error, tensors, np.memmap(path, dtype=np.uint8, mode="r"))
