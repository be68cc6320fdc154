"""The paged KV cache, the decode kernels' contract, chunked prefill and the continuous-batching
scheduler, on CPU (the CUDA graph and Triton side is in test_torch_cuda.py)."""

import threading
import time
from dataclasses import replace
from pathlib import Path

import interpreted_checks
import pytest
import torch
from engine_chain import greedy_chain

from engine.decode_graphs import bucket_for, buckets_up_to
from engine.kv_cache import PAD_BLOCK, KVCacheFull, PagedKVCache, blocks_for
from engine.model_file import load_model_file
from engine.paged_attention import decode_attention_dense, decode_attention_host, splits_for
from engine.session_errors import SessionError
from engine.torch_engine import TorchShardEngine
from engine.types import GenerationRequest, SamplingParams
from scripts.synthetic_gguf import write_synthetic_llama

GREEDY = SamplingParams(temperature=0)


def _cache(pool_tokens: int = 64, sessions: int = 4, block: int = 16) -> PagedKVCache:
    return PagedKVCache(
        2, 2, 16, max_sessions=sessions, max_context=64, pool_tokens=pool_tokens, block_size=block,
        device=torch.device("cpu"), dtype=torch.float32,
    )


def test_blocks_are_taken_as_sessions_grow_and_returned_on_release() -> None:
    kv = _cache(pool_tokens=64)  # 4 blocks of 16 + the pad block
    assert kv.free_blocks == 4 and blocks_for(17, 16) == 2 and blocks_for(16, 16) == 1
    kv.ensure(0, 1)
    kv.ensure(0, 16)  # same block
    assert kv.blocks_of(0) == 1 and kv.free_blocks == 3
    kv.ensure(1, 40)
    assert kv.blocks_of(1) == 3 and kv.free_blocks == 0
    assert kv.table[0, :1].tolist() + kv.table[1, :3].tolist() == [1, 2, 3, 4]  # lowest first, never the pad
    with pytest.raises(KVCacheFull):
        kv.ensure(0, 17)
    assert kv.blocks_of(0) == 1  # a refused ensure takes nothing
    kv.release(1)
    assert kv.free_blocks == 3 and kv.table[1].eq(PAD_BLOCK).all()
    kv.ensure(0, 64)
    assert kv.blocks_of(0) == 4
    with pytest.raises(ValueError):
        kv.ensure(0, 65)  # past max_context


def test_a_pool_smaller_than_sessions_x_context_serves_short_sessions() -> None:
    kv = _cache(pool_tokens=64, sessions=4)
    for s in range(4):
        kv.ensure(s, 16)  # four sessions of 16 positions in a pool of 64, where 4 x 64 would be needed
    assert kv.free_blocks == 0


def test_write_index_and_gather_follow_the_table() -> None:
    kv = _cache(pool_tokens=64, block=16)
    kv.ensure(2, 5)  # slot 2 takes block 1 first ...
    kv.ensure(0, 20)  # ... slot 0 blocks 2 and 3
    rows = kv.write_index(0, 14, 18)
    assert rows.tolist() == [2 * 16 + 14, 2 * 16 + 15, 3 * 16 + 0, 3 * 16 + 1]
    kf = kv.k[1].flatten(0, 1)
    kf[rows] = torch.arange(4.0)[:, None, None].expand(4, 2, 16)
    k, _ = kv.gather(1, 0, 14, 18)  # [Hkv, 4, D]
    assert k[:, :, 0].tolist() == [[0.0, 1.0, 2.0, 3.0]] * 2


def test_buckets() -> None:
    assert buckets_up_to(8) == (1, 2, 4, 8)
    assert buckets_up_to(6) == (1, 2, 4, 6)
    assert buckets_up_to(200)[-2:] == (128, 200)
    assert [bucket_for(n, buckets_up_to(64)) for n in (1, 3, 9, 64)] == [1, 4, 16, 64]
    with pytest.raises(ValueError):
        bucket_for(9, (1, 8))
    assert splits_for(64) == (4, 16) and splits_for(5) == (1, 5)


@pytest.mark.parametrize("window", [0, 7])
def test_fixed_shape_attention_equals_per_session_attention(window: int) -> None:
    """The graph-safe attention (table + lengths as tensors, masked) against exact per-session SDPA."""
    g = torch.Generator().manual_seed(0)
    kv = _cache(pool_tokens=256, sessions=4, block=16)
    for layer in range(2):
        kv.k[layer].normal_(generator=g)
        kv.v[layer].normal_(generator=g)
    slots, positions = [3, 0, 1], [0, 37, 16]
    for s, p in zip(slots, positions, strict=True):
        kv.ensure(s, p + 1)
    q = torch.randn(3, 4, 16, generator=g)  # 4 query heads over 2 KV heads
    host = decode_attention_host(q, kv, 1, slots, positions, window=window, scale=0.25)
    dense = decode_attention_dense(
        q, kv.k[1], kv.v[1], kv.table[slots], torch.tensor(positions) + 1, window=window, scale=0.25
    )
    torch.testing.assert_close(dense, host, rtol=1e-5, atol=1e-5)


# -- the engine on the real model ---------------------------------------------------------------

PROMPT = "<|im_start|>user\nTell me a long story about a dragon and a knight.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_model_file("smollm2-135m-instruct")


def test_chunked_prefill_gives_the_same_tokens(model) -> None:
    engines = [TorchShardEngine(model, max_sessions=1, max_context=256, prefill_chunk=c) for c in (5, 512)]
    try:
        ids = engines[0].tokenizer.encode(PROMPT)
        assert len(ids) % 5 and len(ids) > 15  # several chunks, and a short last one
        (a, la), (b, lb) = (greedy_chain([e], "s", ids, 24) for e in engines)
        assert torch.nn.functional.cosine_similarity(la, lb).item() > 0.999  # ggml rounds 1-row and many-row products apart
        assert a == b
    finally:
        for e in engines:
            e.close()


def test_a_long_prompt_does_not_stall_other_sessions_decode(model) -> None:
    """A 400-token prompt arrives while a stream decodes: in chunks of 32 the stream keeps getting
    tokens while the prompt is being read; in one piece it would get none."""
    engine = TorchShardEngine(model, max_sessions=2, max_context=512, prefill_chunk=32)
    try:
        stamps: list[float] = []
        started = threading.Event()
        done = threading.Event()  # set once the prompt is read: the stream's later tokens count for nothing

        def stream() -> None:
            req = GenerationRequest("a", replace(GREEDY, max_tokens=120), prompt=PROMPT)
            for _ in engine.generate(req, done):
                stamps.append(time.monotonic())
                if len(stamps) == 3:
                    started.set()

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(60)
        long_ids = torch.tensor((engine.tokenizer.encode(PROMPT) * 20)[:400])
        engine.open_session("long")
        t0 = time.monotonic()
        engine.prefill_stage("long", long_ids, 0)
        t1 = time.monotonic()
        engine.close_session("long")
        done.set()
        t.join(120)
        during = [s for s in stamps if t0 < s < t1]
        assert len(during) >= 5, (len(during), t1 - t0)  # 400 / 32 = 13 chunks, a token between most
    finally:
        engine.close()


def test_sessions_joining_and_leaving_mid_batch_keep_their_text(model) -> None:
    engine = TorchShardEngine(model, max_sessions=4, max_context=512, prefill_chunk=16)
    try:
        prompts = [PROMPT, PROMPT.replace("dragon", "robot"), PROMPT.replace("knight", "cat")]
        lengths = [40, 12, 28]

        def text(i: int) -> str:
            req = GenerationRequest(f"r{i}", replace(GREEDY, max_tokens=lengths[i]), prompt=prompts[i])
            return "".join(c.text for c in engine.generate(req, threading.Event()))

        alone = [text(i) for i in range(3)]
        got: dict[int, str] = {}

        def run(i: int, delay: float) -> None:
            time.sleep(delay)
            got[i] = text(i)

        threads = [threading.Thread(target=run, args=(i, 0.15 * i)) for i in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert [got[i] for i in range(3)] == alone
    finally:
        engine.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_synthetic_llama(tmp_path_factory.mktemp("kv") / "tiny.gguf", "tiny-512", "Q4_0")


def test_a_thousand_short_sessions_leak_no_blocks(tiny) -> None:
    """Finish, cancel (close while a step is in flight) and failure all give the blocks back."""
    engine = TorchShardEngine(load_model_file(str(tiny)), max_sessions=4, max_context=64, kv_tokens=128)
    try:
        total = engine.kv_free_blocks
        rng = torch.Generator().manual_seed(0)
        for i in range(1000):
            sid = f"s{i}"
            engine.open_session(sid, GREEDY)
            n = int(torch.randint(1, 40, (), generator=rng))
            ids = torch.randint(0, 4000, (n,), generator=rng)
            if i % 3 == 0:  # finished: prompt and a decoded token
                logits = engine.prefill_stage(sid, ids, 0)
                engine.prefill_stage(sid, torch.tensor(engine.sample([sid], logits)), n)
            elif i % 3 == 1:  # cancelled: closed by another thread while its prompt runs
                closer = threading.Thread(target=engine.close_session, args=(sid,))
                closer.start()
                try:
                    engine.prefill_stage(sid, ids, 0)
                except SessionError:
                    pass  # closed before the step was taken
                closer.join()
            else:  # failed: a position that does not follow the cache
                with pytest.raises(SessionError):
                    engine.prefill_stage(sid, ids, 5)
            engine.close_session(sid)
            assert engine.n_sessions == 0
        assert engine.kv_free_blocks == total
    finally:
        engine.close()


def test_a_full_pool_fails_only_the_session_that_overflows(tiny) -> None:
    engine = TorchShardEngine(load_model_file(str(tiny)), max_sessions=2, max_context=64, kv_tokens=64)
    try:
        engine.open_session("a", GREEDY)
        engine.open_session("b", GREEDY)
        engine.prefill_stage("a", torch.arange(40), 0)  # 2 of the pool's 2 blocks of 32
        with pytest.raises(SessionError, match="KV cache full"):
            engine.prefill_stage("b", torch.arange(8), 0)
        engine.prefill_stage("a", torch.tensor([5]), 40)  # a is unharmed
        engine.close_session("a")
        engine.prefill_stage("b", torch.arange(8), 0)  # and b runs once blocks are back
    finally:
        engine.close()


def test_the_fixed_shape_decode_step_equals_the_host_step(model) -> None:
    """ShardModel's CUDA decode step (device-side positions, slots and block table; here with the
    dense attention, on CPU) gives the logits of the CPU step, padded rows included."""
    engine = TorchShardEngine(model, max_sessions=4, max_context=256, weights="full")
    try:
        m = engine.shard
        g = torch.Generator().manual_seed(3)
        slots, positions = [2, 0, 3], [9, 33, 17]
        for s, p in zip(slots, positions, strict=True):
            m.prefill(s, torch.randint(0, 40000, (p,), generator=g), 0)
        x = torch.randint(0, 40000, (3,), generator=g)
        with torch.inference_mode():
            h = m._embed(x)
            pad = m.kv.pad_slot
            for s, p in zip(slots, positions, strict=True):
                m.kv.ensure(s, p + 1)
            idx = torch.tensor([positions + [0], slots + [pad]])  # a padded bucket of 4
            fixed = m._decode_on_device(torch.cat([h, h[:1]]), idx)[:3]
            host = m._decode_on_host(h, slots, positions)
        torch.testing.assert_close(fixed, host, rtol=1e-3, atol=5e-3)
        assert torch.equal(fixed.argmax(-1), host.argmax(-1))
    finally:
        engine.close()


def test_the_triton_decode_kernels_match_torch(pytestconfig) -> None:
    """The CUDA kernels themselves, run by Triton's interpreter on CPU (interpreted_checks.KERNEL_CHECK,
    run in the background). Attention: GQA of 2, 3 and 4 heads per KV head, head sizes 16/64/256, sliding
    windows, a long session over many splits, a pad row and stale NaN past a session's end. RoPE + cache
    write: both pair layouts."""
    pytest.importorskip("triton")
    out = interpreted_checks.result(pytestconfig, "decode")
    out.check_returncode()
    assert float(out.stdout.strip().splitlines()[-1]) < 0.05, out.stdout  # fp16 rounding at most (bf16 runs on the GPU tests)


def test_the_fused_elementwise_kernels_match_torch(pytestconfig) -> None:
    """Residual add + RMSNorm and activation x up, as CUDA runs them (Triton's interpreter here:
    interpreted_checks.FUSED_CHECK)."""
    pytest.importorskip("triton")
    out = interpreted_checks.result(pytestconfig, "fused")
    out.check_returncode()
    assert float(out.stdout.strip().splitlines()[-1]) < 0.02, out.stdout  # fp16 rounding


def test_streams_that_outgrow_the_pool_step_aside_and_finish(model) -> None:
    """Three 48-token streams through a pool of four 32-position blocks (each needs two or three): a
    stream the pool cannot grow yields its blocks and recomputes once others finish (preemption by
    recompute), instead of failing with "KV cache full"; every block comes back."""
    engine = TorchShardEngine(model, max_sessions=3, max_context=256, kv_tokens=128)
    try:
        total = engine.kv_free_blocks
        got: dict[int, list] = {}

        def run(i: int) -> None:
            req = GenerationRequest(f"p{i}", replace(GREEDY, max_tokens=48), prompt=PROMPT + f"Chapter {i}:")
            got[i] = list(engine.generate(req, threading.Event()))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(180)
        assert sorted(got) == [0, 1, 2]
        for chunks in got.values():
            assert chunks[-1].finish_reason is not None and sum(len(c.token_ids) for c in chunks) >= 40
        assert engine.preemptions >= 1
        assert engine.kv_free_blocks == total and engine.n_sessions == 0
    finally:
        engine.close()


def test_a_stream_longer_than_the_whole_pool_fails_with_a_clear_error(tiny) -> None:
    engine = TorchShardEngine(load_model_file(str(tiny)), max_sessions=1, max_context=256, kv_tokens=64)
    try:
        engine.open_session("a", GREEDY)
        engine.prefill_stage("a", torch.arange(60), 0)
        from engine.torch_generate import _wait_for_blocks

        with pytest.raises(SessionError, match="do not fit the pool even alone"):
            _wait_for_blocks(engine, "a", 100, threading.Event())
        engine.close_session("a")
        assert engine.kv_free_blocks == 2
    finally:
        engine.close()
