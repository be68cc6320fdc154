"""ggml graphs built once and replayed (engine/ggml_graphs.py) give the same bits as graphs built per
call, hand out results that later calls do not overwrite, and stay within their byte bound."""

import numpy as np
import pytest
import torch

from engine import ggml_cpu
from engine.ggml_cpu import GgmlCpu, GgmlWeight
from engine.model_file import load_model_file
from engine.torch_engine import TorchShardEngine
from shard.spec import ShardSpec


def weight(ggml: GgmlCpu, type_name: str, rows: int, cols: int, seed: int) -> int:
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 0.05
    return ggml.register(GgmlWeight(type_name, rows, cols, ggml_cpu.quantize(type_name, w).reshape(-1)))


@pytest.fixture
def ggml():
    g = GgmlCpu(n_threads=1)
    yield g
    g.close()


def both(monkeypatch, fn):
    """fn() with graphs cached (twice: built, then replayed) and built per call."""
    monkeypatch.setattr(ggml_cpu, "GRAPH_CACHE", True)
    built, replayed = fn(), fn()
    monkeypatch.setattr(ggml_cpu, "GRAPH_CACHE", False)
    return built, replayed, fn()


@pytest.mark.parametrize("m", [1, 2, 5, 16, 40])
def test_cached_products_are_the_bits_of_products_built_per_call(ggml, monkeypatch, m) -> None:
    # a prompt chunk (40 rows) is built per call by default: cache it here to check its graph too
    monkeypatch.setattr(ggml_cpu, "CACHED_ROWS", 64)
    ws = [weight(ggml, t, n, 256, i) for i, (t, n) in enumerate([("Q4_0", 96), ("Q8_0", 32), ("Q4_K", 64)])]
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m))
    built, replayed, fresh = both(monkeypatch, lambda: ggml.matmul(x, ws, [96, 32, 64]))
    for a, b, c in zip(built, replayed, fresh, strict=True):
        assert a.shape == (m, a.shape[1]) and torch.equal(a, c) and torch.equal(b, c)


def test_cached_embedding_rows_are_the_rows_built_per_call(ggml, monkeypatch) -> None:
    table = weight(ggml, "Q6_K", 50, 256, 7)
    ids = torch.tensor([3, 49, 0, 3])
    built, replayed, fresh = both(monkeypatch, lambda: ggml.get_rows(table, ids, 256))
    assert torch.equal(built, fresh) and torch.equal(replayed, fresh)


def test_results_are_the_callers_own(ggml) -> None:
    w = weight(ggml, "Q8_0", 64, 256, 1)
    x = torch.randn(3, 256)
    (first,) = ggml.matmul(x, [w], [64])
    kept = first.clone()
    ggml.matmul(torch.randn(3, 256), [w], [64])  # the same graph, other input
    assert torch.equal(first, kept)


def test_the_cache_stays_within_its_bytes_and_is_freed_on_close(monkeypatch) -> None:
    monkeypatch.setattr(ggml_cpu, "GRAPH_CACHE_BYTES", 64 * 1024)
    g = GgmlCpu(n_threads=1)
    try:
        ws = [weight(g, "Q4_0", 64, 256, i) for i in range(4)]
        x = torch.randn(16, 256)
        want = {}
        for m in range(1, 17):  # growing row counts: the arenas grow and drop what they held
            for w in ws:
                want[w, m] = g.matmul(x[:m], [w], [64])[0]
                assert g._cache.header_bytes <= g._cache.max_bytes
        assert 1 <= len(g._cache) < 64  # evicted, least recently used first
        for (w, m), y in want.items():  # rebuilt where evicted: the same bits
            assert torch.equal(g.matmul(x[:m], [w], [64])[0], y)
    finally:
        g.close()
    assert len(g._cache) == 0 and g._cache.header_bytes == 0


def test_a_stage_decode_step_is_the_same_bits_with_graphs_cached(monkeypatch) -> None:
    m = load_model_file("smollm2-135m-instruct")
    engine = TorchShardEngine(m, spec=ShardSpec(m.digest, 0, 4, m.n_layers), threads=1, max_sessions=2,
                              max_context=64)
    shard = engine.shard
    try:
        for s in range(2):
            shard.prefill(s, torch.tensor([1, 2, 3, 4, 5 + s]), 0, last="none")
        ids = torch.tensor([11, 12])
        got = []
        for cache in (True, True, False):
            monkeypatch.setattr(ggml_cpu, "GRAPH_CACHE", cache)
            got.append(shard.decode([0, 1], ids, [5, 5]))  # rewrites position 5: the same step each time
        assert not got[2].isnan().any()
        assert torch.equal(got[0], got[2]) and torch.equal(got[1], got[2])
    finally:
        engine.close()
