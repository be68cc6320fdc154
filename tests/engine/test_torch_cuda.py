"""The quantized torch engine on CUDA (run on the GPU machine; skipped where there is none).

A Q4_K_M-like synthetic GGUF (written with gguf, quantized with ggml): int4 (tinygemm) for the
4-bit tensors, bf16 for the 6-bit ones, against the dequantized fp32 model on CPU.
"""

from pathlib import Path

import pytest
import torch

from engine.linear import LinearFactory
from engine.torch_model import ShardModel
from scripts.synthetic_gguf import write_synthetic_llama
from shard.loader import load_shard
from shard.spec import ShardSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda") if torch.cuda.is_available() else None


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cuda") / "tiny.gguf"
    return write_synthetic_llama(path, "tiny-512", "Q4_K", tokenizer=False, mix="Q4_K_M")


def _model(path: Path, start: int, end: int, device: torch.device, form: str, sessions: int = 8) -> ShardModel:
    """form: "full", "quantized" (tinygemm) or "quantized-triton" (engine/int4_triton.py)."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    kernel = "triton" if form == "quantized-triton" else "tinygemm"
    lin = LinearFactory(form.removesuffix("-triton"), device, dtype, None, kernel)  # type: ignore[arg-type]
    return ShardModel(load_shard(path, ShardSpec("t", start, end, 4)), lin, max_sessions=sessions, max_context=256)


@pytest.mark.parametrize("form", ["quantized", "quantized-triton"])
def test_cuda_quantized_matches_cpu_dequantized(gguf_path, form):
    ids = torch.randint(0, 4096, (24,), generator=torch.Generator().manual_seed(0))
    ref = _model(gguf_path, 0, 4, torch.device("cpu"), "full").prefill(0, ids, 0, last="all")
    out = _model(gguf_path, 0, 4, CUDA, form).prefill(0, ids, 0, last="all").cpu()
    cos = torch.nn.functional.cosine_similarity(ref, out, dim=-1)
    assert cos.min() > 0.99, cos
    assert (ref.argmax(-1) == out.argmax(-1)).float().mean() >= 0.9


def test_cuda_split_gives_the_whole_models_greedy_ids(gguf_path):
    whole = _model(gguf_path, 0, 4, CUDA, "quantized")
    first, last = _model(gguf_path, 0, 2, CUDA, "quantized"), _model(gguf_path, 2, 4, CUDA, "quantized")
    ids = torch.randint(0, 4096, (12,), generator=torch.Generator().manual_seed(1))

    def greedy(step) -> list[int]:  # noqa: ANN001
        logits, pos, out = step(ids, 0), 12, []
        for _ in range(16):
            t = int(logits[-1].argmax())
            out.append(t)
            logits, pos = step(torch.tensor([t]), pos), pos + 1
        return out

    def chain(x: torch.Tensor, pos: int) -> torch.Tensor:
        return last.prefill(0, first.prefill(0, x, pos), pos)

    assert greedy(lambda x, pos: whole.prefill(0, x, pos)) == greedy(chain)


@pytest.mark.parametrize("form", ["quantized", "quantized-triton"])
def test_cuda_wide_batch_decode_agrees_with_each_alone(gguf_path, form):
    """8 sessions in one batched step (8 int4 rows, masked attention) against each alone."""
    m = _model(gguf_path, 0, 4, CUDA, form)
    g = torch.Generator().manual_seed(2)
    for s in range(8):
        m.prefill(s, torch.randint(0, 4096, (5 + s,), generator=g), 0)
    x = torch.randint(0, 4096, (8,), generator=g)
    pos = [5 + s for s in range(8)]
    together = m.decode(list(range(8)), x, pos).cpu()
    alone = torch.cat([m.decode([s], x[s : s + 1], [pos[s]]).cpu() for s in range(8)])
    cos = torch.nn.functional.cosine_similarity(together, alone, dim=-1)
    assert cos.min() > 0.999, cos
    if form == "quantized":  # tinygemm multiplies row by row: the same bits alone or batched
        assert torch.equal(together.argmax(-1), alone.argmax(-1))
    else:  # Triton picks its kernel by row count (engine/int4_triton.launch_for): same top-1 where it is clear
        top2 = alone.topk(2, dim=-1).values
        clear = top2[:, 0] - top2[:, 1] > 1e-2 * top2[:, 0].abs()
        assert clear.any() and torch.equal(together.argmax(-1)[clear], alone.argmax(-1)[clear])


def _greedy_batch(m: ShardModel, prompts: list[torch.Tensor], n: int) -> list[list[int]]:
    """n greedy tokens for each prompt, all sessions decoding together (one batched step per token)."""
    slots = list(range(len(prompts)))
    tokens = [[int(m.prefill(s, p, 0)[-1].argmax())] for s, p in zip(slots, prompts, strict=True)]
    pos = [len(p) for p in prompts]
    for _ in range(n - 1):
        logits = m.decode(slots, torch.tensor([t[-1] for t in tokens]), pos)
        for s, row in zip(slots, logits.argmax(-1).tolist(), strict=True):
            tokens[s].append(row)
        pos = [p + 1 for p in pos]
    for s in slots:
        m.release(s)
    return tokens


def test_graphed_decode_gives_the_eager_tokens(gguf_path):
    """64 greedy tokens from CUDA-graph replays equal the same fixed-shape step run eagerly, alone and
    as a batch of 5 (a padded bucket of 8), for int4 (both kernels) and bf16 weights."""
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 4096, (3 + 7 * i,), generator=g) for i in range(5)]
    for form in ("quantized", "quantized-triton", "full"):
        graphed = _model(gguf_path, 0, 4, CUDA, form)
        eager = _model(gguf_path, 0, 4, CUDA, form)
        eager.graphs = None
        assert graphed.graphs is not None
        assert _greedy_batch(graphed, prompts[:1], 64) == _greedy_batch(eager, prompts[:1], 64)
        assert _greedy_batch(graphed, prompts, 64) == _greedy_batch(eager, prompts, 64)
        assert graphed.graphs.captured == (1, 8)
        assert graphed.kv.free_blocks == graphed.kv.n_blocks - 1  # every block back


def test_triton_decode_kernel_matches_dense_attention_in_bf16():
    from engine.kv_cache import PagedKVCache
    from engine.paged_attention import decode_attention_dense
    from engine.paged_attention_triton import paged_decode

    g = torch.Generator(device=CUDA).manual_seed(0)
    for heads, kv_heads, dim in [(32, 8, 128), (9, 3, 64), (4, 1, 256)]:
        kv = PagedKVCache(1, kv_heads, dim, max_sessions=8, max_context=2048, pool_tokens=8192, block_size=32,
                          device=CUDA, dtype=torch.bfloat16)
        kv.k[0].normal_(generator=g)
        kv.v[0].normal_(generator=g)
        slots, pos = [7, 0, 1, 8], [0, 2000, 31, 0]  # 8: the pad row
        for s, p in zip(slots[:3], pos, strict=False):
            kv.ensure(s, p + 1)
        kv.sync_table()
        q = torch.randn(4, heads, dim, generator=g, device=CUDA, dtype=torch.bfloat16)
        lens = torch.tensor(pos, device=CUDA, dtype=torch.int32) + 1
        rows = kv.table_dev[torch.tensor(slots, device=CUDA)]
        for window in (0, 512):
            a = paged_decode(q, kv.k[0], kv.v[0], rows, lens, window=window, scale=dim**-0.5)
            b = decode_attention_dense(q, kv.k[0], kv.v[0], rows, lens, window=window, scale=dim**-0.5)
            torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_one_row_gemv_matches_cublas():
    """Batch-1 bf16 products (engine/gemv_triton.py), plain and with the FFN activation fused, against
    cuBLAS on the same weights."""
    from engine.fused import gate_up_act
    from engine.linear import DenseLinear

    g = torch.Generator(device=CUDA).manual_seed(5)
    for n, k in [(6144, 4096), (576, 576), (3072, 576)]:
        w = torch.randn(n, k, generator=g, device=CUDA, dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, 1, k, generator=g, device=CUDA, dtype=torch.bfloat16)
        lin = DenseLinear(w, None, (n // 2, n // 2))
        assert lin.one_row_gemv(x)
        ref = torch.nn.functional.linear(x, w).float()
        torch.testing.assert_close(torch.cat(lin(x), -1).float(), ref, atol=2e-2, rtol=2e-2)
        gate, up = ref.split(n // 2, -1)
        torch.testing.assert_close(gate_up_act(lin, x, "silu").float(), torch.nn.functional.silu(gate) * up,
                                   atol=2e-2, rtol=2e-2)


def _tokenizer_gguf(tmp_path_factory) -> Path | None:
    """A GGUF with a tokenizer, as a TorchShardEngine needs: $MESHLLM_TOK_GGUF (the GPU machine has
    no embedded model), else a synthetic one with SmolLM2's tokenizer, else None."""
    import os

    if os.environ.get("MESHLLM_TOK_GGUF"):
        return Path(os.environ["MESHLLM_TOK_GGUF"])
    try:
        return write_synthetic_llama(tmp_path_factory.mktemp("tok") / "tok.gguf", "tiny-512", "Q4_K")
    except Exception:  # noqa: BLE001 - no embedded model to take the tokenizer from
        return None


def test_a_stage_batch_on_cuda_captures_off_the_loop_then_replays_on_it(tmp_path_factory):
    """dataplane/stage_batcher.py on CUDA: a batch whose graph is not captured yet runs on a worker
    thread (capturing on the event loop would stall every stream's heartbeats), the same batch again
    replays on the loop, and both give the same outputs."""
    import asyncio
    import importlib.util
    import sys

    from engine.model_file import load_model_file
    from engine.torch_engine import TorchShardEngine

    # the module alone: the dataplane package pulls in the node's network stack (grpc, cryptography),
    # which the GPU machine's image lacks
    spec = importlib.util.spec_from_file_location("stage_batcher", Path(__file__).parents[2] / "dataplane/stage_batcher.py")
    assert spec is not None and spec.loader is not None
    stage_batcher = importlib.util.module_from_spec(spec)
    sys.modules["stage_batcher"] = stage_batcher  # dataclasses look their module up
    spec.loader.exec_module(stage_batcher)
    LoopBatcher = stage_batcher.LoopBatcher  # noqa: N806

    path = _tokenizer_gguf(tmp_path_factory)
    if path is None:
        pytest.skip("no GGUF with a tokenizer")
    engine = TorchShardEngine(load_model_file(str(path)), device="cuda", max_sessions=4, max_context=128)
    sids = [f"c{i}" for i in range(4)]
    for i, sid in enumerate(sids):
        engine.open_session(sid)
        engine.prefill_stage(sid, torch.arange(5 + i, 12 + 2 * i), 0)
    pos = [engine.session_length(s) for s in sids]
    x = [torch.tensor([40 + i]) for i in range(4)]
    batcher = LoopBatcher(engine, gather_s=5.0)

    async def batch() -> list:
        return await asyncio.gather(*(batcher.step(s, x[i], pos[i], group=4) for i, s in enumerate(sids)))

    assert not engine.decode_ready(4)
    first = asyncio.run(batch())  # captures the bucket of 4, off the loop
    assert engine.decode_ready(4) and engine.shard.graphs is not None and 4 in engine.shard.graphs.captured
    again = asyncio.run(batch())  # the same positions (a rewind), replayed on the loop
    assert [size for _, _, size in first] == [4] * 4 and batcher.batches == 2
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a[0], b[0])
    engine.close()
