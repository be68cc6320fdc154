"""ggml's quantized CPU matmuls, through the shared libraries that llama-cpp-python already ships.

Why: on CPU, torch's weight-only int4/int8 ops lose to plain bf16 (docs/torch-engine.md), while ggml's
kernels read GGUF blocks as they are stored (Q4_0 ... Q6_K, F16, BF16, F32) and are what llama.cpp
itself runs. Calling them costs no new dependency and no copy of the weights: a weight is a ggml
tensor header pointing into the GGUF's memory map.

Only documented ggml API is used (no struct layouts): tensors live in no-alloc contexts and get their
addresses with `ggml_backend_tensor_alloc` inside buffers made by `ggml_backend_cpu_buffer_from_ptr`.
A call runs a tiny graph (one `mul_mat` per weight of a group sharing an input, or one `get_rows`) on
the CPU backend; graphs of up to CACHED_ROWS rows are built once and replayed (engine/ggml_graphs.py).
Not thread-safe: one `GgmlCpu` per engine, whose steps are serialised.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import math
import os
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.ggml_graphs import CachedGraph, GraphCache, Place, _InitParams

# enum ggml_type values for the GGUF tensor types we run (ggml.h; GGUF uses the same numbers)
GGML_TYPES = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
    "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "BF16": 30,
}  # fmt: skip
_GGML_TYPE_I32 = 26
# types ggml can write that the engine does not run: tests make files with them to check refusals
_WRITE_ONLY_TYPES = {"IQ4_NL": 20}
ROW_INVARIANT_ROWS = 16  # up to this many input rows, each row is multiplied on its own (see matmul)
_GRAPH_NODES = 4 * ROW_INVARIANT_ROWS * 2  # parts x rows x (view + product), with room
_CTX_BYTES = 512 * 1024  # tensor headers and one small graph per call
_ALIGN = 32
# Graphs of up to this many rows (decode batches, embedding lookups) are built once and replayed;
# longer prompt chunks are built per call (their compute dwarfs the building). GRAPH_CACHE is the
# A/B switch of scripts/bench_stage_cpu.py; the products are the same bits either way.
GRAPH_CACHE = True
CACHED_ROWS = ROW_INVARIANT_ROWS
# Tensor headers held per GgmlCpu, least recently used out first. SmolLM2's 30 layers at every batch
# of 1..16 rows hold 855 graphs in 18 MiB; past the bound, a step's graphs (replayed in layer order)
# evict each other and cost what building them per call does.
GRAPH_CACHE_BYTES = 64 * 1024 * 1024


class GgmlUnavailable(RuntimeError):
    """llama-cpp-python's ggml libraries could not be loaded."""


@dataclass(frozen=True, slots=True)
class _Lib:
    base: ctypes.CDLL
    cpu: ctypes.CDLL


def _find_lib_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise GgmlUnavailable("llama-cpp-python is not installed")
    for loc in spec.submodule_search_locations:
        if glob.glob(os.path.join(loc, "lib", "libggml-base*")):
            return os.path.join(loc, "lib")
    raise GgmlUnavailable("llama-cpp-python ships no libggml-base")


@functools.cache
def _lib() -> _Lib:
    libdir = _find_lib_dir()
    mode = ctypes.RTLD_GLOBAL
    base = ctypes.CDLL(sorted(glob.glob(os.path.join(libdir, "libggml-base.so*")))[0], mode=mode)
    cpu = ctypes.CDLL(sorted(glob.glob(os.path.join(libdir, "libggml-cpu.so*")))[0], mode=mode)
    p, sz, i64, i32 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64, ctypes.c_int
    sigs: list[tuple[ctypes.CDLL, str, type | None, list]] = [
        (base, "ggml_init", p, [_InitParams]),
        (base, "ggml_free", None, [p]),
        (base, "ggml_new_tensor_2d", p, [p, i32, i64, i64]),
        (base, "ggml_mul_mat", p, [p, p, p]),
        (base, "ggml_get_rows", p, [p, p, p]),
        (base, "ggml_view_2d", p, [p, p, i64, i64, sz, sz]),
        (base, "ggml_new_graph_custom", p, [p, sz, ctypes.c_bool]),
        (base, "ggml_backend_free", None, [p]),
        (base, "ggml_build_forward_expand", None, [p, p]),
        (base, "ggml_row_size", sz, [i32, i64]),
        (base, "ggml_blck_size", i64, [i32]),
        (base, "ggml_quantize_chunk", sz, [i32, p, p, i64, i64, i64, p]),
        (base, "ggml_backend_cpu_buffer_from_ptr", p, [p, sz]),
        (base, "ggml_backend_buffer_free", None, [p]),
        (base, "ggml_backend_tensor_alloc", i32, [p, p, p]),
        (base, "ggml_backend_graph_compute", i32, [p, p]),
        (base, "ggml_tensor_overhead", sz, []),
        (base, "ggml_graph_overhead_custom", sz, [sz, ctypes.c_bool]),
        (cpu, "ggml_backend_cpu_init", p, []),
        (cpu, "ggml_backend_cpu_set_n_threads", None, [p, i32]),
    ]
    for lib, name, res, args in sigs:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return _Lib(base, cpu)


def row_bytes(type_name: str, n_cols: int) -> int:
    """Bytes of one row of `n_cols` elements stored as `type_name` (ggml's own arithmetic)."""
    return int(_lib().base.ggml_row_size(_code(type_name), n_cols))


def _code(type_name: str) -> int:
    return GGML_TYPES.get(type_name, _WRITE_ONLY_TYPES.get(type_name, -1))


def block_size(type_name: str) -> int:
    return int(_lib().base.ggml_blck_size(_code(type_name)))


def quantize(type_name: str, values: np.ndarray) -> np.ndarray:
    """ggml's own quantizer (the one llama.cpp's tools use), row by row: float32 [rows, cols] ->
    uint8 [rows, row_bytes]. gguf's numpy code cannot quantize K-quants; this can."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    rows, cols = values.shape
    if cols % block_size(type_name):
        raise ValueError(f"{type_name} rows hold whole blocks of {block_size(type_name)}, not {cols}")
    out = np.empty((rows, row_bytes(type_name, cols)), dtype=np.uint8)
    n = _lib().base.ggml_quantize_chunk(_code(type_name), values.ctypes.data, out.ctypes.data, 0, rows, cols, None)
    if n != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {n} bytes, expected {out.nbytes}")
    return out


@dataclass(frozen=True, slots=True)
class GgmlWeight:
    """A [rows, cols] matrix in a GGUF type; `data` is its raw bytes (often a view of the memory map)."""

    type_name: str
    rows: int  # out_features
    cols: int  # in_features
    data: np.ndarray  # uint8, rows * row_bytes

    def __post_init__(self) -> None:
        if self.type_name not in GGML_TYPES:
            raise ValueError(f"ggml type {self.type_name} is not supported")
        if self.cols % block_size(self.type_name):
            raise ValueError(f"{self.type_name} rows hold whole blocks of {block_size(self.type_name)}, not {self.cols}")
        if self.data.dtype != np.uint8 or self.data.ndim != 1 or not self.data.flags.c_contiguous:
            raise ValueError("weight data must be contiguous uint8 bytes")
        if self.data.nbytes != self.rows * row_bytes(self.type_name, self.cols):
            raise ValueError(
                f"{self.type_name} [{self.rows}, {self.cols}] needs "
                f"{self.rows * row_bytes(self.type_name, self.cols)} bytes, got {self.data.nbytes}"
            )


def _aligned(a: np.ndarray) -> np.ndarray:
    """ggml's CPU buffers must start on a 32-byte boundary."""
    if a.ctypes.data % _ALIGN == 0:
        return a
    raw = np.empty(a.nbytes + _ALIGN, dtype=np.uint8)
    off = -raw.ctypes.data % _ALIGN
    out = raw[off : off + a.nbytes]
    out[:] = a
    return out


def _aligned_tensor(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % _ALIGN == 0 else t.clone()  # a fresh CPU tensor is 64-byte aligned


class GgmlCpu:
    """Runs quantized matmuls and embedding lookups for one engine on `n_threads` CPU threads."""

    def __init__(self, n_threads: int) -> None:
        lib = _lib()
        self._b = lib.base
        self._backend = lib.cpu.ggml_backend_cpu_init()
        if not self._backend:
            raise GgmlUnavailable("ggml_backend_cpu_init failed")
        lib.cpu.ggml_backend_cpu_set_n_threads(self._backend, max(1, n_threads))
        # persistent headers of the weights, each bound into a buffer over its own bytes
        self._wctx = self._b.ggml_init(_InitParams(64 * 1024 * 1024, None, True))
        self._weights: list[tuple[int, int, np.ndarray]] = []  # (tensor, buffer, keep-alive array)
        self._scratch = ctypes.create_string_buffer(_CTX_BYTES)
        self._cache = GraphCache(self._b, max_bytes=GRAPH_CACHE_BYTES, graph_nodes=_GRAPH_NODES)

    def register(self, w: GgmlWeight) -> int:
        """Makes a ggml tensor over `w.data` (no copy); returns its handle for `matmul`/`get_rows`."""
        t = self._b.ggml_new_tensor_2d(self._wctx, GGML_TYPES[w.type_name], w.cols, w.rows)
        data = _aligned(w.data)  # GGUF data is 32-byte aligned in the file: no copy for the memory map
        ptr = data.ctypes.data
        buf = self._b.ggml_backend_cpu_buffer_from_ptr(ptr, data.nbytes)
        if not t or not buf or self._b.ggml_backend_tensor_alloc(buf, t, ptr) != 0:
            raise GgmlUnavailable(f"could not bind a {w.type_name} tensor")
        self._weights.append((t, buf, data))
        return t

    def matmul(self, x: torch.Tensor, weights: Sequence[int], out_features: Sequence[int]) -> list[torch.Tensor]:
        """x: [..., K] float32 -> [x @ W_i.T for each weight]: [..., N_i] float32, in one graph.

        Up to ROW_INVARIANT_ROWS rows, each row is its own product (one graph node per row): ggml
        picks kernels by M (llamafile's tinyBLAS for M >= 2 on Q4_0/Q8_0/F16..., the dot-product
        path for M = 1), and they round differently. Row by row, a session's decode step gives the
        same bits alone or batched with others, so concurrent requests never change each other's
        output; on this CPU the row products cost about what one M-row product does (compute-bound).
        Outputs keep x's leading dimensions: a cached graph's views have them already, where a
        reshape per input and a view per output cost more than the graph's replay bookkeeping.
        """
        if x.dtype != torch.float32 or x.dim() < 2:
            raise ValueError("ggml matmul takes float32 [..., K]")
        lead, k = x.shape[:-1], x.shape[-1]
        m = math.prod(lead)
        per_row = 1 < m <= ROW_INVARIANT_ROWS
        if GRAPH_CACHE and m <= CACHED_ROWS:
            key = ("mm", tuple(weights), x.shape, per_row)  # K too: x of another width builds (and fails) as uncached, never broadcasts
            g = self._cache.get(key) or self._cache_matmul(key, lead, k, weights, out_features, per_row)
            return self._replay(g, x)
        b = self._b
        x = _aligned_tensor(x.reshape(m, k))
        outs = [torch.empty((*lead, n), dtype=torch.float32) for n in out_features]
        with self._graph() as (ctx, graph, bufs):
            xt = b.ggml_new_tensor_2d(ctx, 0, k, m)
            bufs.append(self._bind(xt, x))
            places = []
            for out, n in zip(outs, out_features, strict=True):
                bufs.append(self._buffer(out))
                places.append(Place(bufs[-1], out.data_ptr(), n * 4))
            self._products(ctx, graph, xt, m, k, weights, places, per_row)
            self._compute(graph)
        return outs

    def _cache_matmul(
        self, key: Hashable, lead: torch.Size, k: int, weights: Sequence[int], out_features: Sequence[int],
        per_row: bool,
    ) -> CachedGraph:
        m = math.prod(lead)

        def build(ctx: int, graph: int, xp: Place, places: list[Place]) -> None:
            xt = self._b.ggml_new_tensor_2d(ctx, 0, k, m)
            self._alloc(xp.buf, xt, xp.addr)
            self._products(ctx, graph, xt, m, k, weights, places, per_row)

        n_tensors = 1 + len(weights) * (2 * m if per_row else 1)  # x, then (view +) product per row
        return self._cache.add(key, (*lead, k), torch.float32, [(*lead, n) for n in out_features], n_tensors, build)

    def _products(
        self, ctx: int, graph: int, xt: int, m: int, k: int, weights: Sequence[int], places: list[Place],
        per_row: bool,
    ) -> None:
        """Adds x @ W_i.T (xt: [M, K]) to `graph`, into places[i]: one product, or one per row (see matmul)."""
        b = self._b
        for w, p in zip(weights, places, strict=True):
            if not per_row:
                y = b.ggml_mul_mat(ctx, w, xt)
                self._alloc(p.buf, y, p.addr)
                b.ggml_build_forward_expand(graph, y)
                continue
            for i in range(m):
                xi = b.ggml_view_2d(ctx, xt, k, 1, k * 4, i * k * 4)
                y = b.ggml_mul_mat(ctx, w, xi)
                self._alloc(p.buf, y, p.addr + i * p.row_bytes)
                b.ggml_build_forward_expand(graph, y)

    def get_rows(self, weight: int, ids: torch.Tensor, cols: int) -> torch.Tensor:
        """Rows `ids` [T] of a registered matrix, dequantized: [T, cols] float32."""
        ids = ids.to(torch.int32)
        t = ids.shape[0]
        b = self._b

        def build(ctx: int, graph: int, xp: Place, places: list[Place]) -> None:
            it = b.ggml_new_tensor_2d(ctx, _GGML_TYPE_I32, t, 1)
            self._alloc(xp.buf, it, xp.addr)
            y = b.ggml_get_rows(ctx, weight, it)
            self._alloc(places[0].buf, y, places[0].addr)
            b.ggml_build_forward_expand(graph, y)

        if GRAPH_CACHE and t <= CACHED_ROWS:
            key = ("rows", weight, t)
            g = self._cache.get(key) or self._cache.add(key, (1, t), torch.int32, [(t, cols)], 2, build)
            return self._replay(g, ids.view(1, t))[0]
        ids = _aligned_tensor(ids)
        out = torch.empty((t, cols), dtype=torch.float32)
        with self._graph() as (ctx, graph, bufs):
            bufs += [self._buffer(ids), self._buffer(out)]
            build(ctx, graph, Place(bufs[0], ids.data_ptr(), 0), [Place(bufs[1], out.data_ptr(), cols * 4)])
            self._compute(graph)
        return out

    def _replay(self, g: CachedGraph, x: torch.Tensor) -> list[torch.Tensor]:
        g.x.copy_(x)
        self._compute(g.graph)
        return [o.clone() for o in g.outs]  # the arena is the next call's: callers keep their own

    @contextlib.contextmanager
    def _graph(self) -> Iterator[tuple[int, int, list[int]]]:
        """A per-call context over the scratch memory, its graph, and the buffers to free after."""
        b = self._b
        ctx = b.ggml_init(_InitParams(_CTX_BYTES, ctypes.addressof(self._scratch), True))
        bufs: list[int] = []
        try:
            yield ctx, b.ggml_new_graph_custom(ctx, _GRAPH_NODES, False), bufs
        finally:
            for buf in bufs:
                b.ggml_backend_buffer_free(buf)
            b.ggml_free(ctx)

    def _compute(self, graph: int) -> None:
        if self._b.ggml_backend_graph_compute(self._backend, graph) != 0:
            raise RuntimeError("ggml graph compute failed")

    def _buffer(self, t: torch.Tensor) -> int:
        """A ggml buffer over a torch tensor's memory (the caller frees it)."""
        buf = self._b.ggml_backend_cpu_buffer_from_ptr(t.data_ptr(), t.numel() * t.element_size())
        if not buf:
            raise RuntimeError("could not make a ggml buffer")
        return buf

    def _alloc(self, buf: int, tensor: int, addr: int) -> None:
        if not tensor or self._b.ggml_backend_tensor_alloc(buf, tensor, addr) != 0:
            raise RuntimeError("could not bind a ggml tensor")

    def _bind(self, tensor: int, t: torch.Tensor) -> int:
        buf = self._buffer(t)
        try:
            self._alloc(buf, tensor, t.data_ptr())
        except RuntimeError:
            self._b.ggml_backend_buffer_free(buf)
            raise
        return buf

    def close(self) -> None:
        self._cache.clear()  # its graphs point at the weights' headers
        if self._wctx:
            for _, buf, _ in self._weights:
                self._b.ggml_backend_buffer_free(buf)
            self._weights.clear()
            self._b.ggml_free(self._wctx)
            self._wctx = None
        if self._backend:
            self._b.ggml_backend_free(self._backend)
            self._backend = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the libraries may be gone
            pass
