"""What the engine keeps of a GGUF: its model config, its tensor table, and a memory map of its bytes.

The header is parsed once per file version (shard.gguf_header: no per-element objects, so a 262k-token
vocabulary costs 0.1 s, not gguf-py's 12 s) and only the few facts the engine needs are kept; tensor
bytes are read through a plain `np.memmap`, so only the pages of the tensors used become resident.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shard.config import ModelConfig, ModelConfigError, read_config
from shard.gguf_header import TensorInfo, read_header

__all__ = ["GGUFIndex", "TensorInfo", "open_index"]


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
    """The index of a GGUF, shared per file version (a header costs up to a few tenths of a second)."""
    stat = Path(path).stat()
    return _cached_index(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _cached_index(path: str, size: int, mtime_ns: int) -> GGUFIndex:
    del mtime_ns  # part of the cache key only: a rewritten file gets a fresh index
    header = read_header(path)
    config, error = None, ""
    try:
        config = read_config(header.fields, header.tensors.keys())
    except ModelConfigError as e:
        error = str(e)
    for t in header.tensors.values():
        if t.offset + t.n_bytes > size:
            raise ModelConfigError(f"tensor {t.name} runs past the end of the file (truncated?)")
    return GGUFIndex(path, config, error, header.tensors, np.memmap(path, dtype=np.uint8, mode="r"))
