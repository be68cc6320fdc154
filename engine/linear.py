"""Linear layers over GGUF weights, in the form chosen per device: the quantization transform.

A `Linear` holds one or more weights that share an input (q/k/v, gate/up) and returns one output per
weight, so a kernel can run them together. The model code never touches weight tensors.

| form | device | weights | kernel |
|---|---|---|---|
| `GgmlLinear` | CPU, `quantized` | GGUF bytes as stored (a view of the memory map) | ggml (llama.cpp's own) |
| `Int4Linear` | CUDA, `quantized`, Q4_0/Q4_1/Q4_K | tinygemm int4, group 32, bf16 scale+zero | `torch._weight_int4pack_mm` |
| `TritonInt4Linear` | the same, `int4_kernel="triton"` | int4 codes packed along K, bf16 scale+zero | engine/int4_triton.py |
| `DenseLinear` | `full`, or CUDA types without an int4 form | dequantized 16/32-bit | cuBLAS / MKL |

On CUDA, 6- and 8-bit types (Q5_K, Q6_K, Q8_0) are dequantized to bf16: tinygemm reads only int4,
and `_weight_int8pack_mm` runs at 0.1-0.2x of bf16 (DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from engine.ggml_cpu import GgmlCpu, GgmlWeight
from shard.gguf_tensor import INT4_GROUP, Int4Groups, RawTensor, int4_ok, to_int4_groups

if TYPE_CHECKING:
    from engine.int4_triton import W4Weight

WeightsForm = Literal["quantized", "full"]
WEIGHTS_FORMS: tuple[WeightsForm, ...] = ("quantized", "full")
# which kernel multiplies int4 weights on CUDA: tinygemm is fastest at 1-4 rows, Triton from 8 (above)
Int4Kernel = Literal["tinygemm", "triton"]
INT4_KERNEL_CHOICES = ("auto", "tinygemm", "triton")  # a node's --int4-kernel
WIDE_NODE_KV_SESSIONS = 8  # auto: a node sized for this many full contexts (4x as many sessions) is wide


def int4_kernel_for(choice: str, kv_sessions: int, overlapped_launch: bool = False) -> Int4Kernel:
    """The int4 kernel of a CUDA node. Each stores its own layout, so a node picks one at load, by the
    batches it is sized for and whether its GPU overlaps kernel launches (PDL, engine/pdl.py: Hopper
    and later). On an H200 the Triton form (there the Gluon kernel, engine/int4_gluon.py) multiplies
    one row at 0.88-1.29x tinygemm's speed per Llama-3-8B matrix and 8-128 rows 1.7-14.5x faster;
    before Hopper the Triton kernels decoded one stream 0.92x tinygemm, which launches no faster
    without PDL (docs/benchmarks.md)."""
    if choice == "auto":
        return "triton" if overlapped_launch or kv_sessions >= WIDE_NODE_KV_SESSIONS else "tinygemm"
    if choice in ("tinygemm", "triton"):
        return choice  # type: ignore[return-value]
    raise ValueError(f"int4 kernel must be one of {', '.join(INT4_KERNEL_CHOICES)}")


class Linear(Protocol):
    @property
    def out_features(self) -> tuple[int, ...]: ...

    @property
    def nbytes(self) -> int: ...  # bytes this layer holds on its device (or maps, for GGUF views)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]: ...


@dataclass(slots=True)
class DenseLinear:
    weight: torch.Tensor  # [sum(out_features), in]
    bias: torch.Tensor | None
    out_features: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        b = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.weight.numel() * self.weight.element_size() + b

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.one_row_gemv(x):
            from engine.gemv_triton import gemv  # triton: imported only where it runs

            y = gemv(x.reshape(-1).to(self.weight.dtype), self.weight).view(*x.shape[:-1], -1)
            y = y if self.bias is None else y + self.bias
        else:
            y = F.linear(x.to(self.weight.dtype), self.weight, self.bias)
        return list(y.split(self.out_features, dim=-1)) if len(self.out_features) > 1 else [y]

    def one_row_gemv(self, x: torch.Tensor) -> bool:
        """Whether engine/gemv_triton.py multiplies x: one 16-bit row on CUDA (batch-1 decode), K <= 8192."""
        w = self.weight
        return (
            w.is_cuda and w.dtype in (torch.bfloat16, torch.float16) and x.numel() == w.shape[1]
            and w.shape[1] <= 8192 and w.is_contiguous() and _gemv_available()
        )  # fmt: skip


class GgmlLinear:
    """Runs every weight of the group in one ggml graph; x is float32 [..., in]."""

    def __init__(self, ggml: GgmlCpu, parts: Sequence[RawTensor], bias: torch.Tensor | None) -> None:
        self._ggml = ggml
        self._handles = tuple(
            ggml.register(GgmlWeight(p.type_name, p.rows, p.cols, p.data.reshape(-1))) for p in parts
        )
        self._keep = list(parts)  # the arrays the handles point into
        self.out_features = tuple(p.rows for p in parts)
        self.bias = bias
        self.nbytes = sum(p.nbytes for p in parts) + (0 if bias is None else bias.numel() * 4)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = self._ggml.matmul(x.float(), self._handles, self.out_features)  # [..., N_i] each
        if self.bias is not None:
            y = torch.cat(outs, dim=-1) + self.bias
            outs = list(y.split(self.out_features, dim=-1))
        return outs


class Int4Linear:
    """Group-32 int4 weights on CUDA, multiplied by tinygemm (`torch._weight_int4pack_mm`).

    It reads 4-bit weights at 1.5-1.8x the speed of bf16 cuBLAS for one input row and 1.15-1.2x
    for four, but falls to 0.7-0.9x at 8 rows and 0.25x at 32 (H200, docs/torch-engine.md): wide
    decode batches on CUDA want a fused kernel we do not have yet, or `--weights full`."""

    def __init__(
        self, tiny: torch.Tensor, scales_zeros: torch.Tensor, out_features: tuple[int, ...],
        bias: torch.Tensor | None,
    ) -> None:  # fmt: skip
        self.tiny = tiny  # tinygemm's packed layout
        self.scales_zeros = scales_zeros  # bf16 [K / 32, N, 2]
        self.out_features = out_features
        self.bias = bias
        self._n = sum(out_features)
        self.in_features = scales_zeros.shape[0] * INT4_GROUP
        self.nbytes = (
            tiny.numel() * tiny.element_size() + scales_zeros.numel() * 2 + (0 if bias is None else bias.numel() * 2)
        )

    @classmethod
    def from_raw(cls, parts: Sequence[RawTensor], bias: torch.Tensor | None, device: torch.device) -> Int4Linear:
        return cls.from_groups([to_int4_groups(p) for p in parts], [p.rows for p in parts], bias, device)

    @classmethod
    def from_groups(
        cls, groups: Sequence[Int4Groups], out_features: Sequence[int], bias: torch.Tensor | None,
        device: torch.device,
    ) -> Int4Linear:  # fmt: skip
        q = torch.from_numpy(np.concatenate([g.q for g in groups])).to(device)  # [N, K]: rows stack
        sz = np.stack([np.concatenate([g.scales for g in groups]), np.concatenate([g.zeros for g in groups])], -1)
        scales_zeros = torch.from_numpy(sz).to(device, torch.bfloat16).transpose(0, 1).contiguous()
        return cls(pack_tinygemm(q), scales_zeros, tuple(out_features), bias)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        lead = x.shape[:-1]
        y = torch._weight_int4pack_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), self.tiny, INT4_GROUP, self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias
        y = y.view(*lead, self._n)
        return list(y.split(self.out_features, dim=-1)) if len(self.out_features) > 1 else [y]


class TritonInt4Linear:
    """Group-32 int4 weights on CUDA in engine/int4_triton.py's layout, multiplied by its Triton kernels.

    On Hopper its matmuls run the Gluon kernel (engine/int4_gluon.py). It is the int4 form on Hopper
    and of a node that decodes wide batches, where tinygemm's per-row loop falls to 0.2x of bf16
    (`int4_kernel_for` has the figures against tinygemm)."""

    def __init__(self, w: W4Weight, out_features: tuple[int, ...], bias: torch.Tensor | None) -> None:
        self.w = w
        self.out_features = out_features
        self.bias = bias
        self.nbytes = w.nbytes + (0 if bias is None else bias.numel() * 2)

    @classmethod
    def from_groups(
        cls, groups: Sequence[Int4Groups], out_features: Sequence[int], bias: torch.Tensor | None,
        device: torch.device,
    ) -> TritonInt4Linear:  # fmt: skip
        from engine.int4_triton import pack_int4  # triton: imported only where the kernels run

        q = torch.from_numpy(np.concatenate([g.q for g in groups])).to(device)  # [N, K]
        sz = [torch.from_numpy(np.concatenate(a)).to(device, torch.bfloat16)
              for a in ([g.scales for g in groups], [g.zeros for g in groups])]
        return cls(pack_int4(q, *sz), tuple(out_features), bias)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        from engine.int4_triton import gluon_ok, launch_for, w4_matmul

        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        cfg = launch_for(x2.shape[0], self.w.out_features, self.w.in_features, gluon=gluon_ok(x2, self.w))
        y = w4_matmul(x2, self.w, cfg)
        if self.bias is not None:
            y = y + self.bias
        y = y.view(*lead, y.shape[-1])
        return list(y.split(self.out_features, dim=-1)) if len(self.out_features) > 1 else [y]


_GEMV: bool | None = None


def _gemv_available() -> bool:
    global _GEMV
    if _GEMV is None:
        try:
            import engine.gemv_triton  # noqa: F401 - triton ships with CUDA torch builds
        except ImportError:
            _GEMV = False
        else:
            _GEMV = True
    return _GEMV


def pack_tinygemm(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [N, K] on the device -> tinygemm's layout (even k in the high nibble)."""
    tiles = next(t for t in (8, 4, 2) if q.shape[1] % (16 * t) == 0)  # inner-k tiles: the largest that fit
    return torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), tiles)


@dataclass(slots=True)
class LinearGroup:
    """Weights sharing an input whose types need different kernels (e.g. Q4_K q/k with a Q6_K v)."""

    members: list[Linear]

    @property
    def out_features(self) -> tuple[int, ...]:
        return tuple(n for m in self.members for n in m.out_features)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.members)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [y for m in self.members for y in m(x)]


class Embedding(Protocol):
    def __call__(self, ids: torch.Tensor) -> torch.Tensor: ...  # [T] -> [T, hidden]


@dataclass(slots=True)
class DenseEmbedding:
    weight: torch.Tensor  # [vocab, hidden]

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids.to(self.weight.device), self.weight)


@dataclass(slots=True)
class GgmlEmbedding:
    """Rows dequantized by ggml from the GGUF bytes (CPU): the table stays as stored."""

    ggml: GgmlCpu
    handle: int
    cols: int
    raw: RawTensor  # keeps the bytes alive

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.ggml.get_rows(self.handle, ids.cpu(), self.cols)


@dataclass(slots=True)
class HostEmbedding:
    """Rows dequantized on the host from the GGUF bytes, then moved (CUDA): the table stays in host
    memory as stored, and only T rows per step cross to the device."""

    raw: RawTensor
    device: torch.device
    dtype: torch.dtype

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.raw.take_rows(ids.cpu().numpy()).dequantize()
        return torch.from_numpy(rows).to(self.device, self.dtype)


@dataclass(frozen=True, slots=True)
class LinearFactory:
    """Makes the linear layers of one shard: the chosen form on the chosen device."""

    form: WeightsForm
    device: torch.device
    dtype: torch.dtype  # activations (and dense weights)
    ggml: GgmlCpu | None  # CPU + quantized only
    int4_kernel: Int4Kernel = "tinygemm"  # CUDA + quantized only

    def __call__(self, parts: Sequence[RawTensor], biases: Sequence[torch.Tensor | None] = ()) -> Linear:
        bias = self._bias(parts, biases)
        if self.form == "quantized" and self.ggml is not None:
            return GgmlLinear(self.ggml, parts, None if bias is None else bias.float())
        if self.form == "quantized" and self.device.type == "cuda":
            runs = _runs(parts)  # consecutive parts that share a kernel: one call each
            if len(runs) > 1:
                return _with_bias(LinearGroup([self._cuda(run, None) for run in runs]), bias)
            return self._cuda(parts, bias)
        return self.dense(parts, bias)

    def dense(self, parts: Sequence[RawTensor], bias: torch.Tensor | None = None) -> DenseLinear:
        w = np.concatenate([p.dequantize() for p in parts])
        return DenseLinear(torch.from_numpy(w).to(self.device, self.dtype), bias, tuple(p.rows for p in parts))

    def _cuda(self, parts: Sequence[RawTensor], bias: torch.Tensor | None) -> Linear:
        if _int4_ok(parts[0]) and self.int4_kernel == "triton":
            groups = [to_int4_groups(p) for p in parts]
            return TritonInt4Linear.from_groups(groups, [p.rows for p in parts], bias, self.device)
        if _int4_ok(parts[0]):
            return Int4Linear.from_raw(parts, bias, self.device)
        return self.dense(parts, bias)

    def vector(self, t: torch.Tensor) -> torch.Tensor:
        """A norm weight or bias, in the activation dtype on the device."""
        return t.to(self.device, self.dtype)

    def embedding(self, raw: RawTensor) -> Embedding:
        if self.form == "full":
            return DenseEmbedding(self.dense([raw]).weight)
        if self.ggml is not None:
            handle = self.ggml.register(GgmlWeight(raw.type_name, raw.rows, raw.cols, raw.data.reshape(-1)))
            return GgmlEmbedding(self.ggml, handle, raw.cols, raw)
        return HostEmbedding(raw, self.device, self.dtype)

    def head(self, raw: RawTensor, embedding: Embedding | None) -> Linear:
        """The output head; `embedding`: the same tensor's lookups (a whole tied model), whose dense
        matrix the head reuses rather than copy it."""
        if isinstance(embedding, DenseEmbedding):
            return DenseLinear(embedding.weight, None, (raw.rows,))
        return self([raw])

    def _bias(self, parts: Sequence[RawTensor], biases: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
        if not biases or all(b is None for b in biases):
            return None
        filled = [b if b is not None else torch.zeros(p.rows) for p, b in zip(parts, biases, strict=True)]
        return torch.cat(filled).to(self.device, self.dtype)


def _int4_ok(p: RawTensor) -> bool:
    return int4_ok(p.type_name, p.rows, p.cols)


def _runs(parts: Sequence[RawTensor]) -> list[list[RawTensor]]:
    runs: list[list[RawTensor]] = []
    for p in parts:
        if runs and _int4_ok(runs[-1][0]) == _int4_ok(p):
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def _with_bias(group: LinearGroup, bias: torch.Tensor | None) -> Linear:
    if bias is None:
        return group
    return _BiasedGroup(group, bias)


@dataclass(slots=True)
class _BiasedGroup:
    group: LinearGroup
    bias: torch.Tensor

    @property
    def out_features(self) -> tuple[int, ...]:
        return self.group.out_features

    @property
    def nbytes(self) -> int:
        return self.group.nbytes + self.bias.numel() * self.bias.element_size()

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = torch.cat(self.group(x), dim=-1) + self.bias
        return list(y.split(self.out_features, dim=-1))
