"""Writes a Llama-shaped GGUF with random quantized weights and SmolLM2's tokenizer, for benchmarks.

    .venv/bin/python scripts/synthetic_gguf.py llama-1b /tmp/llama-1b-q4_1.gguf [--type Q4_1]

llama.cpp and the torch engine both load it, so both sides of a benchmark read the same bytes. Weights
are drawn from a normal distribution and quantized with ggml's quantizer (gguf's numpy code has no
K-quants and takes minutes for a billion values); the text it generates is noise, which does not
matter for speed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np

PRESETS = {  # n_layers, hidden, heads, kv heads, ffn, rope base
    "llama-1b": (16, 2048, 32, 8, 8192, 500000.0),
    "smollm2-135m": (30, 576, 9, 3, 1536, 100000.0),
    "tiny-512": (4, 512, 8, 2, 1536, 10000.0),  # K-quant friendly (rows of 256), for tests
}
# Q4_K_M's recipe, roughly: 6-bit V and FFN-down, 4-bit elsewhere, an 8-bit embedding
MIXES = {"Q4_K_M": {"attn_v": "Q6_K", "ffn_down": "Q6_K"}}


def write_synthetic_llama(
    path: Path, preset: str, type_name: str = "Q4_1", seed: int = 0, *, tokenizer: bool = True,
    mix: str = "", iq4_nl_tensor: str = "",
) -> Path:  # fmt: skip
    """`tokenizer`: copy SmolLM2's tokenizer (needs the embedded model); else a bare 4096-token vocab
    that only the shard loader reads. `mix`: a per-tensor type recipe from MIXES over `type_name`.
    `iq4_nl_tensor`: one tensor (e.g. "blk.1.ffn_up") written as IQ4_NL, a type the engine refuses."""
    from engine import ggml_cpu

    n_layers, hidden, heads, kv_heads, ffn, base = PRESETS[preset]
    tok = None
    vocab = 4096
    if tokenizer:
        from engine.model_file import resolve_path
        from shard.gguf_header import read_header  # gguf.GGUFReader takes 2 s over this vocabulary

        tok = read_header(resolve_path("smollm2-135m-instruct")[0])
        vocab = len(tok.fields["tokenizer.ggml.tokens"])
    overrides = MIXES[mix] if mix else {}
    head_dim = hidden // heads
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"synthetic-{preset}")
    w.add_block_count(n_layers)
    w.add_context_length(8192)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(base)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    for name, value in tok.fields.items() if tok is not None else ():
        if not name.startswith("tokenizer."):
            continue
        vtype, *sub = tok.types[name]
        if sub:  # the writer takes arrays as Python lists
            value = value.tolist() if isinstance(value, np.ndarray) else list(value)
        w.add_key_value(name, value, vtype, sub_type=sub[0] if sub else None)
    rng = np.random.default_rng(seed)

    def matrix(name: str, rows: int, cols: int, qtype: str = "") -> None:
        qtype = qtype or overrides.get(name.split(".")[-2], type_name)
        if iq4_nl_tensor and name == iq4_nl_tensor + ".weight":
            qtype = "IQ4_NL"
        values = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float32)
        data = ggml_cpu.quantize(qtype, values)
        w.add_tensor(name, data, raw_shape=(rows, data.shape[1]), raw_dtype=gguf.GGMLQuantizationType[qtype])

    def vector(name: str, n: int) -> None:
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    matrix("token_embd.weight", vocab, hidden, "Q8_0")
    vector("output_norm.weight", hidden)
    for i in range(n_layers):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", hidden)
        vector(p + "ffn_norm.weight", hidden)
        matrix(p + "attn_q.weight", heads * head_dim, hidden)
        matrix(p + "attn_k.weight", kv_heads * head_dim, hidden)
        matrix(p + "attn_v.weight", kv_heads * head_dim, hidden)
        matrix(p + "attn_output.weight", hidden, heads * head_dim)
        matrix(p + "ffn_gate.weight", ffn, hidden)
        matrix(p + "ffn_up.weight", ffn, hidden)
        matrix(p + "ffn_down.weight", hidden, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("path", type=Path)
    ap.add_argument("--type", default="Q4_1")
    args = ap.parse_args()
    print(write_synthetic_llama(args.path, args.preset, args.type))


if __name__ == "__main__":
    main()
