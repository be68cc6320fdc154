"""Tiny llama (permuted Q/K, tied head) and qwen2 (biases, own head) GGUFs written with gguf's writer:
loading them and running ShardModel matches an independent HF-style forward of the original weights."""

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.ggml_cpu import GgmlCpu
from engine.linear import LinearFactory
from engine.torch_model import ShardModel
from shard.loader import load_shard
from shard.spec import ShardSpec

N_LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, BASE, EPS = 2, 16, 4, 2, 4, 32, 50, 10000.0, 1e-5


def _hf_weights(arch: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.3

    w = {"token_embd.weight": r(VOCAB, HIDDEN), "output_norm.weight": 1 + r(HIDDEN)}
    if arch == "qwen2":
        w["output.weight"] = r(VOCAB, HIDDEN)
    for i in range(N_LAYERS):
        p = f"blk.{i}."
        w |= {
            p + "attn_norm.weight": 1 + r(HIDDEN),
            p + "attn_q.weight": r(HEADS * HEAD_DIM, HIDDEN),
            p + "attn_k.weight": r(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "attn_v.weight": r(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "attn_output.weight": r(HIDDEN, HEADS * HEAD_DIM),
            p + "ffn_norm.weight": 1 + r(HIDDEN),
            p + "ffn_gate.weight": r(FFN, HIDDEN),
            p + "ffn_up.weight": r(FFN, HIDDEN),
            p + "ffn_down.weight": r(HIDDEN, FFN),
        }
        if arch == "qwen2":
            w |= {p + "attn_q.bias": r(HEADS * HEAD_DIM), p + "attn_k.bias": r(KV_HEADS * HEAD_DIM)}
            w |= {p + "attn_v.bias": r(KV_HEADS * HEAD_DIM)}
    return w


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:  # convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write(path: Path, arch: str, weights: dict[str, torch.Tensor]) -> None:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(N_LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(BASE)
    writer.add_layer_norm_rms_eps(EPS)
    writer.add_vocab_size(VOCAB)
    for name, t in weights.items():
        if arch == "llama" and ("attn_q." in name or "attn_k." in name):
            t = _permute(t, HEADS if "attn_q." in name else KV_HEADS)
        writer.add_tensor(name, np.ascontiguousarray(t.numpy(), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _hf_forward(w: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Plain HF Llama/Qwen2 forward (rotate_half RoPE, repeated KV heads); logits [T, vocab]."""
    t = ids.shape[0]
    inv = 1.0 / BASE ** (torch.arange(0, HEAD_DIM, 2).double() / HEAD_DIM)
    ang = torch.outer(torch.arange(t).double(), inv)
    cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()

    def rope(x: torch.Tensor) -> torch.Tensor:  # x: [H, T, D]
        half = HEAD_DIM // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def norm(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * g

    h = w["token_embd.weight"][ids]
    for i in range(N_LAYERS):
        p = f"blk.{i}."
        x = norm(h, w[p + "attn_norm.weight"])
        q = F.linear(x, w[p + "attn_q.weight"], w.get(p + "attn_q.bias"))
        k = F.linear(x, w[p + "attn_k.weight"], w.get(p + "attn_k.bias"))
        v = F.linear(x, w[p + "attn_v.weight"], w.get(p + "attn_v.bias"))
        q = rope(q.view(t, HEADS, HEAD_DIM).transpose(0, 1))
        k = rope(k.view(t, KV_HEADS, HEAD_DIM).transpose(0, 1)).repeat_interleave(HEADS // KV_HEADS, 0)
        v = v.view(t, KV_HEADS, HEAD_DIM).transpose(0, 1).repeat_interleave(HEADS // KV_HEADS, 0)
        scores = (q @ k.transpose(-1, -2)) / HEAD_DIM**0.5
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        o = (scores.softmax(-1) @ v).transpose(0, 1).reshape(t, HEADS * HEAD_DIM)
        h = h + F.linear(o, w[p + "attn_output.weight"])
        x = norm(h, w[p + "ffn_norm.weight"])
        h = h + F.linear(
            F.silu(F.linear(x, w[p + "ffn_gate.weight"])) * F.linear(x, w[p + "ffn_up.weight"]),
            w[p + "ffn_down.weight"],
        )
    return F.linear(norm(h, w["output_norm.weight"]), w.get("output.weight", w["token_embd.weight"]))


@pytest.mark.parametrize("form", ["quantized", "full"])  # F32 tensors: ggml's F32 kernel, or torch's
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_matches_hf_forward(tmp_path: Path, arch: str, form: str) -> None:
    weights = _hf_weights(arch)
    path = tmp_path / f"tiny-{arch}.gguf"
    _write(path, arch, weights)
    ids = torch.tensor([3, 17, 42, 8, 1, 29, 5])
    ref = _hf_forward(weights, ids)
    ggml = GgmlCpu(1) if form == "quantized" else None
    lin = LinearFactory(form, torch.device("cpu"), torch.float32, ggml)

    def model(start: int, end: int) -> ShardModel:
        spec = ShardSpec("tiny", start, end, 2)
        return ShardModel(load_shard(path, spec), lin, max_sessions=1, max_context=16, kv_dtype=torch.float32)

    # whole model, then a 2-way split chained: both equal the reference at every position
    whole = model(0, 2)
    torch.testing.assert_close(whole.prefill(0, ids, 0, last="all"), ref, rtol=1e-4, atol=1e-4)
    first, last = model(0, 1), model(1, 2)
    assert last.config.attn_bias == (arch == "qwen2") and last.config.tied_embeddings == (arch == "llama")
    h = first.prefill(0, ids[:4], 0)
    h2 = first.prefill(0, ids[4:], 4)  # continuing a session: positions 4..6
    out = torch.cat([last.prefill(0, h, 0, last="all"), last.prefill(0, h2, 4, last="all")])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
