"""A GGUF tensor as stored (raw quantized bytes), and the exact conversions the engines need from it.

Raw bytes stay a view of the file's memory map until an engine decides their form: ggml reads them
as they are (CPU), 4-bit types become tinygemm int4 groups (CUDA), anything else can be dequantized.
Rows of every GGUF type are quantized independently along the input dimension, so selecting or
permuting rows (llama.cpp's Q/K permutation, embedding lookups) is a byte-level operation.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from shard.gguf_index import TensorInfo

# Types the torch engine runs (quantized on CPU through ggml; on CUDA, 4-bit types as int4).
SUPPORTED_TYPES = frozenset({"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                             "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"})  # fmt: skip
INT4_TYPES = frozenset({"Q4_0", "Q4_1", "Q4_K"})  # group-32 int4 with a scale and a min: exact
INT4_GROUP = 32


def int4_ok(type_name: str, rows: int, cols: int) -> bool:
    """Whether a weight takes the CUDA int4 form: a 4-bit group type in tinygemm's tile shapes
    (rows by 8, K by 16 x inner_k_tiles with inner_k_tiles >= 2)."""
    return type_name in INT4_TYPES and rows % 8 == 0 and cols % 32 == 0


class TensorTypeError(ValueError):
    """A tensor whose type the engine cannot run, or whose bytes do not match its declared shape."""


@dataclass(frozen=True, slots=True)
class RawTensor:
    """`rows` x `cols` values (torch's [out_features, in_features]) in GGUF type `type_name`."""

    name: str
    type_name: str
    rows: int
    cols: int
    data: np.ndarray  # uint8 [rows, row_bytes]

    @property
    def row_bytes(self) -> int:
        return int(self.data.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def qtype(self) -> gguf.GGMLQuantizationType:
        return gguf.GGMLQuantizationType[self.type_name]

    def take_rows(self, rows: np.ndarray) -> RawTensor:
        """The rows `rows` (a copy): a permutation, or the embeddings of some token ids."""
        return RawTensor(self.name, self.type_name, len(rows), self.cols, np.ascontiguousarray(self.data[rows]))

    def dequantize(self) -> np.ndarray:
        """float32 [rows, cols]."""
        out = gguf.quants.dequantize(self.data, self.qtype)
        return np.asarray(out, dtype=np.float32).reshape(self.rows, self.cols)


def raw_tensor(t: TensorInfo, data: np.ndarray, rows: int, cols: int) -> RawTensor:
    """Wraps a tensor's bytes (uint8, a view of the map) as [rows, cols], checking type and size."""
    if t.type_name not in SUPPORTED_TYPES:
        raise TensorTypeError(f"tensor {t.name} has type {t.type_name}, which this engine cannot run")
    block, type_bytes = gguf.GGML_QUANT_SIZES[t.qtype]
    if cols % block:
        raise TensorTypeError(f"tensor {t.name} ({t.type_name}): {cols} columns is not a multiple of {block}")
    row_bytes = cols // block * type_bytes
    if data.nbytes != rows * row_bytes:
        raise TensorTypeError(
            f"tensor {t.name} ({t.type_name}): {data.nbytes} bytes, expected {rows * row_bytes} for [{rows}, {cols}]"
        )
    return RawTensor(t.name, t.type_name, rows, cols, data.reshape(rows, row_bytes))


@dataclass(frozen=True, slots=True)
class Int4Groups:
    """w[n, k] = (q[n, k] - 8) * scales[n, k // 32] + zeros[n, k // 32], q in 0..15 (tinygemm's form)."""

    q: np.ndarray  # uint8 [N, K]
    scales: np.ndarray  # float32 [N, K / 32]
    zeros: np.ndarray  # float32 [N, K / 32]


def to_int4_groups(t: RawTensor) -> Int4Groups:
    """Exact re-expression of Q4_0 / Q4_1 / Q4_K blocks as group-32 int4 (before any rounding of the
    scales to the kernel's 16-bit type)."""
    n, k = t.rows, t.cols
    if t.type_name == "Q4_K":
        blocks = t.data.reshape(-1, 144)  # d f16, dmin f16, 12 bytes of 6-bit scales/mins, 128 bytes
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [nb, 1]
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mn = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16])  # [nb, 8] each
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        q = (qs & 0x0F).reshape(n, k)  # 64-value chunks: low nibbles then high nibbles
        scale = d * sc.astype(np.float32)  # w = scale * q - dmin * min
        zero = -dmin * mn.astype(np.float32) + 8 * scale
    elif t.type_name in ("Q4_0", "Q4_1"):
        size = 18 if t.type_name == "Q4_0" else 20
        blocks = t.data.reshape(-1, size)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [nb, 1]
        qs = blocks[:, size - 16 :].reshape(-1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)
        q = (qs & 0x0F).reshape(n, k)  # elements 0..15 in low nibbles, 16..31 in high
        scale = d
        if t.type_name == "Q4_0":  # w = d * (q - 8)
            zero = np.zeros_like(d)
        else:  # w = d * q + m
            zero = blocks[:, 2:4].copy().view(np.float16).astype(np.float32) + 8 * d
    else:
        raise TensorTypeError(f"{t.name}: {t.type_name} is not a 4-bit group type")
    groups = k // INT4_GROUP
    return Int4Groups(
        q=np.ascontiguousarray(q, dtype=np.uint8),
        scales=scale.reshape(n, groups).astype(np.float32),
        zeros=zero.reshape(n, groups).astype(np.float32),
    )


def int4_dequantize(g: Int4Groups) -> np.ndarray:
    """float32 [N, K] from int4 groups (the reference the kernels are checked against)."""
    n, k = g.q.shape
    w = (g.q.astype(np.float32) - 8).reshape(n, -1, INT4_GROUP)
    return (w * g.scales[:, :, None] + g.zeros[:, :, None]).reshape(n, k)
