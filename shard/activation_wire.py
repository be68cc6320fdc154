"""Activations on the wire: raw tensor bytes with dtype and shape, cut into frames of at most 1 MiB.

A frame is a msgpack map {"pos", "dtype", "shape", "i", "n", "data"}; frames i = 0..n-1 of one
tensor are concatenated by the receiver, which checks the byte count against dtype and shape before
building the tensor. No pickle, no torch.save: a peer can only ever send numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass(slots=True)
class ActivationAssembler:
    """Collects the frames of one tensor; `add` returns (pos, tensor) once the last frame is in."""

    _meta: dict[str, Any] | None = None
    _parts: list[bytes] = field(default_factory=list)
    _size: int = 0

    def add(self, frame: dict[str, Any]) -> tuple[int, torch.Tensor] | None:
        pos, dtype, shape, i, n, data = (frame.get(k) for k in ("pos", "dtype", "shape", "i", "n", "data"))
        if not (isinstance(pos, int) and pos >= 0 and dtype in _DTYPES and isinstance(data, bytes)):
            raise ActivationError("bad activation frame")
        if not (isinstance(shape, list) and 1 <= len(shape) <= 4 and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ActivationError("bad activation shape")
        if not (isinstance(n, int) and 1 <= n <= MAX_FRAMES and isinstance(i, int) and i == len(self._parts)):
            raise ActivationError("activation frames out of order")
        meta = {"pos": pos, "dtype": dtype, "shape": shape, "n": n}
        if self._meta is None:
            self._meta = meta
        elif meta != self._meta:
            raise ActivationError("activation frames disagree")
        self._size += len(data)
        if len(data) > FRAME_BYTES or self._size > MAX_TENSOR_BYTES:
            raise ActivationError("activation frame too large")
        self._parts.append(data)
        if len(self._parts) < n:
            return None
        raw = b"".join(self._parts)
        self._meta, self._parts, self._size = None, [], 0
        torch_dtype = _DTYPES[dtype]
        numel = 1
        for d in shape:
            numel *= d
        if len(raw) != numel * torch.empty((), dtype=torch_dtype).element_size():
            raise ActivationError("activation byte count does not match its shape")
        view_dtype = torch.int16 if torch_dtype == torch.bfloat16 else torch_dtype
        x = torch.frombuffer(bytearray(raw), dtype=view_dtype).reshape(shape)
        return pos, (x.view(torch.bfloat16) if torch_dtype == torch.bfloat16 else x)
