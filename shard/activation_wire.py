"""Activations on the wire: raw tensor bytes with dtype and shape, cut into frames of at most 1 MiB.

A frame is a msgpack map {"pos", "dtype", "shape", "i", "n", "data"}; frames i = 0..n-1 of one
tensor are written by the receiver into one buffer sized from the first frame's dtype and shape,
which a stage checks against its own hidden size and context first (`ActivationLimits`). No pickle, no torch.save: a peer can only ever send numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

FRAME_BYTES = 1 << 20
MAX_TENSOR_BYTES = 256 << 20  # a 64k-token prompt of an 8k-hidden model in fp16 is 1 GiB: cap far below
MAX_FRAMES = MAX_TENSOR_BYTES // FRAME_BYTES + 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}
_NAMES = {v: k for k, v in _DTYPES.items()}


class ActivationError(ValueError):
    """A malformed or oversized activation frame."""


def encode_activation(x: torch.Tensor, pos: int) -> list[dict[str, Any]]:
    """Frames of one tensor (moved to CPU, contiguous)."""
    x = x.detach().to("cpu").contiguous()
    if x.dtype not in _NAMES:
        raise ActivationError(f"unsupported dtype {x.dtype}")
    # bfloat16 has no numpy dtype: ship its bytes through an int16 view.
    raw = (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy().tobytes()
    if len(raw) > MAX_TENSOR_BYTES:
        raise ActivationError(f"activation of {len(raw)} bytes exceeds {MAX_TENSOR_BYTES}")
    n = max(1, -(-len(raw) // FRAME_BYTES))
    meta = {"pos": pos, "dtype": _NAMES[x.dtype], "shape": list(x.shape), "n": n}
    return [{**meta, "i": i, "data": raw[i * FRAME_BYTES : (i + 1) * FRAME_BYTES]} for i in range(n)]


@dataclass(frozen=True, slots=True)
class ActivationLimits:
    """What a stage accepts: hidden states [T, hidden_size] of a float dtype, 1 <= T <= max_tokens.

    Checked on a tensor's first frame, before any byte is buffered (issue 11, findings 7 and 9)."""

    hidden_size: int
    max_tokens: int
    dtypes: frozenset[str] = frozenset({"float32", "float16", "bfloat16"})

    def __post_init__(self) -> None:
        if self.hidden_size < 1 or self.max_tokens < 1:
            raise ValueError("hidden_size and max_tokens must be positive")

    def check(self, dtype: str, shape: list[int]) -> None:
        if dtype not in self.dtypes:
            raise ActivationError(f"this stage takes {sorted(self.dtypes)} activations, not {dtype}")
        if len(shape) != 2 or shape[1] != self.hidden_size or not 1 <= shape[0] <= self.max_tokens:
            raise ActivationError(
                f"this stage takes activations of shape [T, {self.hidden_size}] with 1 <= T <= {self.max_tokens}, "
                f"not {shape}")


def _n_bytes(dtype: str, shape: list[int]) -> int:
    return math.prod(shape) * _DTYPES[dtype].itemsize


@dataclass(slots=True)
class ActivationAssembler:
    """Collects the frames of one tensor; `add` returns (pos, tensor) once the last frame is in.

    The first frame's dtype and shape fix the tensor's size (checked against `limits` when given): the
    buffer is allocated once at that size, every frame must carry exactly its slice, and the tensor is
    built over the buffer without another copy. A peer can make a stage hold no more than one announced
    tensor, and only one that the stage could run."""

    limits: ActivationLimits | None = None
    _meta: dict[str, Any] | None = None
    _buf: bytearray | None = None
    _size: int = 0
    _next: int = 0

    @property
    def in_progress(self) -> bool:
        """Some frames of a tensor are in, not all."""
        return self._meta is not None

    def reset(self) -> None:
        self._meta, self._buf, self._size, self._next = None, None, 0, 0

    def add(self, frame: dict[str, Any]) -> tuple[int, torch.Tensor] | None:
        pos, dtype, shape, i, n, data = (frame.get(k) for k in ("pos", "dtype", "shape", "i", "n", "data"))
        if not (type(pos) is int and pos >= 0 and isinstance(dtype, str) and dtype in _DTYPES
                and isinstance(data, bytes)):
            raise ActivationError("bad activation frame")
        if not (isinstance(shape, list) and 1 <= len(shape) <= 4 and all(isinstance(d, int) and 0 <= d < 1 << 31 for d in shape)):
            raise ActivationError("bad activation shape")
        if not (isinstance(n, int) and 1 <= n <= MAX_FRAMES and isinstance(i, int) and i == self._next):
            raise ActivationError("activation frames out of order")
        meta = {"pos": pos, "dtype": dtype, "shape": shape, "n": n}
        if self._meta is None:
            if self.limits is not None:
                self.limits.check(dtype, shape)
            size = _n_bytes(dtype, shape)
            if size > MAX_TENSOR_BYTES:
                raise ActivationError(f"activation of {size} bytes exceeds {MAX_TENSOR_BYTES}")
            if n != max(1, -(-size // FRAME_BYTES)):
                raise ActivationError("activation frame count does not match its shape")
            self._meta, self._buf, self._size = meta, bytearray(size), size
        elif meta != self._meta:
            raise ActivationError("activation frames disagree")
        assert self._buf is not None
        at = i * FRAME_BYTES
        if len(data) != min(FRAME_BYTES, self._size - at):
            raise ActivationError("activation byte count does not match its shape")
        self._buf[at : at + len(data)] = data
        self._next += 1
        if self._next < n:
            return None
        buf = self._buf
        self.reset()
        torch_dtype = _DTYPES[dtype]
        view_dtype = torch.int16 if torch_dtype == torch.bfloat16 else torch_dtype
        x = torch.frombuffer(buf, dtype=view_dtype).reshape(shape) if buf else torch.empty(shape, dtype=view_dtype)
        return pos, (x.view(torch.bfloat16) if torch_dtype == torch.bfloat16 else x)
