"""Gemma-3-270M Q4_K_M (the real GGUF from PyPI, a base model) in the torch engine: parity with
llama.cpp on chat prompts and past the sliding window, layer splits, batched decode, generation."""

import threading

import llama_cpp
import numpy as np
import pytest
import torch
from engine_chain import greedy_chain
from gemma3_file import gemma3_270m_model

from engine.arch_gemma3 import CHAT_TEMPLATE
from engine.chat_template import render_chat
from engine.torch_engine import TorchShardEngine
from engine.types import FinishReason, GenerationRequest, SamplingParams
from shard.spec import ShardSpec

CTX = 640  # room for a prompt past the 512-token sliding window
N_LAYERS = 18
GREEDY = SamplingParams(temperature=0)
CHATS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Write a haiku about the sea."},
    ],
]


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)  # see test_torch_engine.py: one thread is faster on the shared cores
    return gemma3_270m_model()


@pytest.fixture(scope="module")
def whole(model):
    engine = TorchShardEngine(model, max_sessions=4, max_context=CTX)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def llama(model):
    # f32 KV cache: llama.cpp's default f16 cache alone costs ~2e-4 of last-position cosine here
    llm = llama_cpp.Llama(model.path, n_ctx=CTX, n_threads=1, flash_attn=False, type_k=0, type_v=0, verbose=False)
    yield llm
    llm.close()


def _chat(engine: TorchShardEngine, messages: list[dict[str, str]]) -> list[int]:
    tok = engine.tokenizer
    return tok.encode(render_chat(CHAT_TEMPLATE, messages, bos_token=tok.bos_text, eos_token=tok.eos_text))


def _llama_logits(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits [vocab] of the prompt's last position (without logits_all, which would cost
    a 262k-row head matmul per prompt position)."""
    llm.reset()
    llm.eval(ids)
    row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).astype(np.float64)


def _logits(engine: TorchShardEngine, ids: list[int]) -> np.ndarray:
    engine.open_session("logits")
    try:
        return engine.prefill_stage("logits", torch.tensor(ids), 0)[0].double().numpy()
    finally:
        engine.close_session("logits")


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_config_reads_gemma3_quirks(whole) -> None:
    c = whole.config
    assert [i for i in range(N_LAYERS) if not c.is_sliding(i)] == [5, 11, 17]  # llama.cpp's swa pattern 6
    assert (c.sliding_window, c.rope_base, c.rope_base_swa, c.rope_scale) == (512, 1e6, 1e4, 1.0)
    assert (c.head_dim, c.n_heads, c.n_kv_heads, c.embed_scale, c.attn_scale) == (256, 4, 1, 640**0.5, 1 / 16)
    assert c.tied_embeddings and not c.rope_interleaved


@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_chat_prompt_logits_match_llama_cpp(whole, llama, chat) -> None:
    ids = _chat(whole, CHATS[chat])
    assert ids[:2] == [whole.tokenizer.bos_id, 105]  # <bos><start_of_turn>
    ours, ref = _logits(whole, ids), _llama_logits(llama, ids)
    print(f"chat {chat}: cos {_cos(ours, ref):.5f}")  # measured 0.99959 and 0.99981
    assert ours.argmax() == ref.argmax()
    assert _cos(ours, ref) >= 0.999  # a wrong sliding-layer RoPE base gives 0.998 here


def _long_chat(engine: TorchShardEngine, n_tokens: int) -> list[int]:
    """A chat prompt of about n_tokens: a numbered list the model has to read to the start."""
    lines = [f"{i}. The {i}th visitor brought {i % 7 + 2} apples and left at {i % 12 + 1} o'clock." for i in range(1, 200)]
    for n in range(10, len(lines)):
        text = "Here is a log:\n" + "\n".join(lines[:n]) + "\nWho brought the most apples?"
        ids = _chat(engine, [{"role": "user", "content": text}])
        if len(ids) >= n_tokens:
            return ids
    raise AssertionError("prompt too short")


def test_prompt_past_sliding_window_matches_llama_cpp(whole, llama) -> None:
    ids = _long_chat(whole, 560)  # > 512: the sliding layers must drop the oldest keys
    assert whole.config.sliding_window == 512 and 560 <= len(ids) < CTX - 8
    ref, ours = _llama_logits(llama, ids), _logits(whole, ids)
    cos = _cos(ours, ref)
    whole.shard.window = 10**9  # the same model with every layer global
    try:
        unmasked = _cos(_logits(whole, ids), ref)
    finally:
        whole.shard.window = whole.config.sliding_window
    print(f"{len(ids)} tokens: cos {cos:.5f}; without the window {unmasked:.5f}")  # 0.99972; 0.99470
    assert ours.argmax() == ref.argmax() and cos >= 0.999
    assert unmasked < cos - 0.001  # the window matters on this prompt


def test_decode_past_sliding_window_batched_equals_alone(whole) -> None:
    """Sessions at positions around and past the window: decode's masks agree with prefill's slices."""
    prompts = [_long_chat(whole, 505), _chat(whole, CHATS[0])]  # the first crosses 512 while decoding
    alone = [greedy_chain([whole], f"alone{i}", p, 12)[0] for i, p in enumerate(prompts)]
    sids = [f"b{i}" for i in range(len(prompts))]
    for s in sids:
        whole.open_session(s, GREEDY)
    try:
        first = [whole.prefill_stage(s, torch.tensor(p), 0) for s, p in zip(sids, prompts, strict=True)]
        out = [[t] for t in whole.sample(sids, torch.cat(first))]
        for _ in range(11):
            pos = [whole.session_length(s) for s in sids]
            logits = whole.decode_stage(sids, torch.tensor([o[-1] for o in out]), pos)
            for o, t in zip(out, whole.sample(sids, logits), strict=True):
                o.append(t)
    finally:
        for s in sids:
            whole.close_session(s)
    assert out == alone


@pytest.fixture(scope="module")
def stages(model):
    made: dict[tuple[int, int], TorchShardEngine] = {}

    def chain(bounds: list[int]) -> list[TorchShardEngine]:
        for a, b in zip(bounds, bounds[1:], strict=False):
            if (a, b) not in made:
                spec = ShardSpec(model.digest, a, b, N_LAYERS)
                made[a, b] = TorchShardEngine(model, spec=spec, max_sessions=1, max_context=256)
        return [made[a, b] for a, b in zip(bounds, bounds[1:], strict=False)]

    yield chain
    for e in made.values():
        e.close()


@pytest.fixture(scope="module")
def reference(whole):
    return greedy_chain([whole], "whole", _chat(whole, CHATS[1]), 64)


# stage boundaries off the global layers (5, 11, 17): stage [5, 12) starts with a global layer
@pytest.mark.parametrize("bounds", [[0, 5, 18], [0, 5, 12, 18]], ids=["2-way", "3-way"])
def test_split_equals_whole_model(whole, stages, reference, bounds) -> None:
    ref_tokens, ref_logits = reference
    tokens, logits = greedy_chain(stages(bounds), "split", _chat(whole, CHATS[1]), 64)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-4)
    assert tokens == ref_tokens


def test_generate_few_shot_chat(whole) -> None:
    """A base model: it answers a few-shot chat in Gemma's template, then rambles rather than ending
    its turn, so a stop string ends it here; <end_of_turn> and <eos> are end-of-generation tokens."""
    assert {1, 106} <= whole.tokenizer.eog_ids  # <eos>, <end_of_turn>
    turns = [("Italy", "Rome"), ("Spain", "Madrid"), ("France", None)]
    messages = []
    for country, capital in turns:
        messages.append({"role": "user", "content": f"What is the capital of {country}?"})
        if capital:
            messages.append({"role": "assistant", "content": f"{capital}."})
    prompt = render_chat(CHAT_TEMPLATE, messages, bos_token=whole.tokenizer.bos_text)
    params = SamplingParams(temperature=0, max_tokens=16, stop=(".",))
    chunks = list(whole.generate(GenerationRequest("g", params, prompt=prompt), threading.Event()))
    assert "".join(c.text for c in chunks) == "Paris"
    assert chunks[-1].finish_reason == FinishReason.STOP


def test_sliding_layers_hold_only_their_window(model) -> None:
    """A 1,200-token Gemma session at a 2,048 context: the 15 sliding layers hold the last 512 keys and
    one prompt chunk, in their own smaller pool; the 3 global layers every position. The budget counts
    the same."""
    from node.config import NodeConfig
    from node.model_loader import torch_shard_bytes
    from shard.memory import estimate_shard_bytes

    engine = TorchShardEngine(model, max_sessions=4, max_context=2048)
    kv = engine.shard.kv
    try:
        assert kv.k[0].shape[0] < kv.k[5].shape[0] / 2  # layer 0 slides, layer 5 is global
        engine.open_session("s", GREEDY)
        ids = torch.randint(0, 200_000, (1200,), generator=torch.Generator().manual_seed(0))
        logits = engine.prefill_stage("s", ids, 0)  # the engine runs it in chunks of 128
        engine.prefill_stage("s", torch.tensor(engine.sample(["s"], logits)), 1200)
        assert kv.blocks_of(0) == 38  # 1,201 positions in blocks of 32
        assert kv.window_blocks_of(0) <= -(-(512 + 128) // 32) + 1
        engine.close_session("s")
    finally:
        engine.close()
    config = NodeConfig(mesh_secret="s", engine="torch", kv_sessions=1)
    spec = ShardSpec.whole_model(model.digest, N_LAYERS)
    with_window = torch_shard_bytes(model, spec, config, 8192)
    from shard.footprint import model_weight_bytes
    from shard.loader import read_model_config

    mc = read_model_config(model.path)
    every_position = estimate_shard_bytes(
        mc, spec, model_weight_bytes(model.path, N_LAYERS, "quantized", "cpu"), kv_dtype_bytes=2,
        context_tokens=8192, n_sessions=1,
    ).total
    assert with_window < every_position - 15 * 8192 * 2 * 256 * 2 // 2  # over half the sliding KV saved


def test_the_fixed_shape_decode_step_reads_the_window_tables(model) -> None:
    """The CUDA decode step's logic (device-side block tables: the window layers' and the global ones;
    here with the dense attention, on CPU) gives the host step's logits for sessions before and past
    the 512-token window, after the window layers have given blocks back."""
    engine = TorchShardEngine(model, max_sessions=4, max_context=1024)
    try:
        m = engine.shard
        g = torch.Generator().manual_seed(3)
        slots, positions = [2, 0, 3], [9, 700, 530]
        for s, p in zip(slots, positions, strict=True):
            ids = torch.randint(0, 200_000, (p,), generator=g)
            for start in range(0, p, 128):  # in chunks, as the engine runs prompts
                m.prefill(s, ids[start : start + 128], start, last="none")
        assert m.kv.table_w[0, 0] == 0 and m.kv.window_blocks_of(0) < m.kv.blocks_of(0)  # blocks went back
        x = torch.randint(0, 200_000, (3,), generator=g)
        with torch.inference_mode():
            h = m._embed(x)
            for s, p in zip(slots, positions, strict=True):
                m.kv.ensure(s, p + 1)
            idx = torch.tensor([positions + [0], slots + [m.kv.pad_slot]])  # a padded bucket of 4
            fixed = m._decode_on_device(torch.cat([h, h[:1]]), idx)[:3]
            host = m._decode_on_host(h, slots, positions)
        # bit-equal before the window; past it the masked dense attention sums in another order, and
        # ggml's 8-bit activations carry that on (cos 0.9999 with the window blocks kept or given back)
        cos = torch.nn.functional.cosine_similarity(fixed, host, dim=-1)
        assert cos.min() > 0.9995 and torch.equal(fixed[0], host[0]), cos
        assert torch.equal(fixed.argmax(-1), host.argmax(-1))
    finally:
        engine.close()
