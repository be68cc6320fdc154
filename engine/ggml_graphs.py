"""ggml graphs built once and replayed: a CPU decode step runs ~60 tiny graphs, and building each
(a context, tensor headers, buffers, one view and product per row) cost more Python than its
compute took ggml (SmolLM2 layers 0-15, batch 1: 3.7 ms of ggml in a 9.3 ms step).

A cached graph's input and outputs live in two arenas shared by every graph of one `GgmlCpu`: its
calls are serialised (one engine's steps run one batch at a time) and each copies its input in and
its outputs out, so only the tensor headers are held per graph. Headers are counted in bytes and the
least recently used graph goes first past `max_bytes`. An arena that must grow drops every graph
(their tensors point into the old one); it grows by doubling, so that happens a few times at most.
"""

from __future__ import annotations

import ctypes
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

_ALIGN = 64  # each output starts on a fresh cache line, as a fresh torch tensor does


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@dataclass(frozen=True, slots=True)
class Place:
    """Where a graph's tensor lies: ggml buffer and address (`addr + row * row_bytes` for row views)."""

    buf: int
    addr: int
    row_bytes: int


# build(ctx, graph, input place, output places): adds the graph's tensors and nodes
Build = Callable[[int, int, Place, list[Place]], None]


@dataclass(slots=True)
class CachedGraph:
    ctx: int
    graph: int
    header_bytes: int
    x: torch.Tensor  # the input's view of the input arena: copy the input here, then compute `graph`
    outs: list[torch.Tensor]  # the outputs' views of the output arena: copy them out before the next call


class _Arena:
    """A torch byte tensor seen by ggml as one CPU buffer."""

    def __init__(self, b: ctypes.CDLL, nbytes: int) -> None:
        self.mem = torch.empty(nbytes, dtype=torch.uint8)  # a fresh CPU tensor is 64-byte aligned
        self.buf = b.ggml_backend_cpu_buffer_from_ptr(self.mem.data_ptr(), nbytes)
        if not self.buf:
            raise RuntimeError("could not make a ggml buffer")

    @property
    def nbytes(self) -> int:
        return self.mem.numel()

    def view(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * dtype.itemsize
        return self.mem[offset : offset + n].view(dtype).view(shape)


def _round_up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class GraphCache:
    """Graphs by key, each with one input and float32 outputs of fixed shapes; a bounded LRU. Not
    thread-safe (nor is its owner, `GgmlCpu`)."""

    def __init__(self, b: ctypes.CDLL, *, max_bytes: int, graph_nodes: int) -> None:
        self._b = b
        self.max_bytes, self._nodes = max_bytes, graph_nodes
        self._graphs: OrderedDict[Hashable, CachedGraph] = OrderedDict()
        self.header_bytes = 0
        self._in: _Arena | None = None
        self._out: _Arena | None = None

    def __len__(self) -> int:
        return len(self._graphs)

    def get(self, key: Hashable) -> CachedGraph | None:
        g = self._graphs.get(key)
        if g is not None:
            self._graphs.move_to_end(key)
        return g

    def add(
        self, key: Hashable, x_shape: tuple[int, ...], x_dtype: torch.dtype, out_shapes: Sequence[tuple[int, ...]],
        n_tensors: int, build: Build,
    ) -> CachedGraph:
        """Builds the graph of `key` with `build` (`n_tensors` bounds the tensors it makes, for its
        context's size). Its input is `x_shape` of `x_dtype`, its outputs float32 `out_shapes`; the
        places `build` gets are of their rows (the last dimension)."""
        b = self._b
        offsets, end = [], 0
        for shape in out_shapes:
            offsets.append(end)
            end += _round_up(math.prod(shape) * 4)
        row_bytes = x_shape[-1] * x_dtype.itemsize
        arena_in, arena_out = self._reserve(math.prod(x_shape[:-1]) * row_bytes, end)
        header = int(b.ggml_tensor_overhead()) * n_tensors + int(b.ggml_graph_overhead_custom(self._nodes, False))
        ctx = b.ggml_init(_InitParams(header, None, True))
        if not ctx:
            raise RuntimeError("ggml_init failed")
        try:
            graph = b.ggml_new_graph_custom(ctx, self._nodes, False)
            xv = arena_in.view(0, x_shape, x_dtype)
            out_base = arena_out.mem.data_ptr()
            outs = [arena_out.view(o, s, torch.float32) for o, s in zip(offsets, out_shapes, strict=True)]
            build(
                ctx, graph, Place(arena_in.buf, xv.data_ptr(), row_bytes),
                [Place(arena_out.buf, out_base + o, s[-1] * 4) for o, s in zip(offsets, out_shapes, strict=True)],
            )
        except BaseException:
            b.ggml_free(ctx)
            raise
        g = CachedGraph(ctx, graph, header, xv, outs)
        self._graphs[key] = g
        self.header_bytes += header
        while self.header_bytes > self.max_bytes and len(self._graphs) > 1:
            _, old = self._graphs.popitem(last=False)
            self._drop(old)
        return g

    def _reserve(self, in_bytes: int, out_bytes: int) -> tuple[_Arena, _Arena]:
        """Arenas of at least these sizes; growing one drops every graph bound to the old ones."""
        if self._in is not None and self._out is not None and in_bytes <= self._in.nbytes and out_bytes <= self._out.nbytes:
            return self._in, self._out
        have_in = self._in.nbytes if self._in else 0
        have_out = self._out.nbytes if self._out else 0
        self.clear()
        self._in = _Arena(self._b, have_in if in_bytes <= have_in else max(in_bytes, 2 * have_in))
        self._out = _Arena(self._b, have_out if out_bytes <= have_out else max(out_bytes, 2 * have_out))
        return self._in, self._out

    def _drop(self, g: CachedGraph) -> None:
        self._b.ggml_free(g.ctx)
        self.header_bytes -= g.header_bytes

    def clear(self) -> None:
        """Frees every graph and the arenas' ggml buffers (the next graph makes new arenas)."""
        while self._graphs:
            self._drop(self._graphs.popitem()[1])
        for arena in (self._in, self._out):
            if arena is not None:
                self._b.ggml_backend_buffer_free(arena.buf)
        self._in = self._out = None
