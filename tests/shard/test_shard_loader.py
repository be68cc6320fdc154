"""Loading layer ranges of the real SmolLM2 GGUF: only the range's tensors, ends handled, Q/K layout."""

import pytest
import torch
from conftest import model_file

from engine.arch_llama import rope
from engine.torch_model import rope_table
from shard.config import ModelConfigError
from shard.loader import ShardLoadError, load_shard, read_model_config
from shard.spec import ShardSpec


@pytest.fixture(scope="module")
def model():
    return model_file("smollm2-135m-instruct")


def test_config_from_metadata(model) -> None:
    c = read_model_config(model.path)
    assert (c.architecture, c.n_layers, c.hidden_size, c.n_heads, c.n_kv_heads, c.head_dim) == (
        "llama",
        30,
        576,
        9,
        3,
        64,
    )
    assert (c.ffn_size, c.vocab_size, c.rope_dim, c.rope_base) == (1536, 49152, 64, 100000.0)
    assert c.rms_eps == pytest.approx(1e-5)
    assert c.tied_embeddings and not c.attn_bias and c.rope_interleaved


def test_first_stage_has_embedding_only(model) -> None:
    w = load_shard(model.path, ShardSpec(model.digest, 0, 2, 30))
    assert len(w.layers) == 2 and w.tok_embd is not None
    assert (w.tok_embd.type_name, w.tok_embd.rows, w.tok_embd.cols) == ("Q8_0", 49152, 576)
    assert w.output is None and w.output_norm is None
    wk = w.layers[0].wk
    assert (wk.type_name, wk.rows, wk.cols) == ("Q4_1", 192, 576)
    assert wk.data.base is not None  # a view of the memory map, not a copy
    assert w.layers[0].attn_norm.dtype == torch.float32


def test_tied_last_stage_loads_token_embd_as_head(model) -> None:
    w = load_shard(model.path, ShardSpec(model.digest, 28, 30, 30))
    assert len(w.layers) == 2 and w.tok_embd is None and w.output is not None
    first = load_shard(model.path, ShardSpec(model.digest, 0, 1, 30))
    assert first.tok_embd is not None and (w.output.data == first.tok_embd.data).all()


def test_spec_must_match_layer_count(model) -> None:
    with pytest.raises(ShardLoadError):
        load_shard(model.path, ShardSpec(model.digest, 0, 2, 31))


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # convert_hf_to_gguf.py LlamaModel.permute, verbatim in torch
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_adjacent_pair_rope_on_stored_rows_equals_rotate_half_on_hf_rows() -> None:
    """The loader keeps llama.cpp's permuted Q/K rows; RoPE on adjacent pairs over them is HF's
    rotate_half over the original rows, permuted the same way (so q.k is unchanged)."""
    d, heads, n_pos = 8, 2, 5
    hf = torch.randn(1, heads, n_pos, d)  # [B, H, T, D] in HF's layout
    stored = _llama_cpp_permute(hf.transpose(2, 3).reshape(heads * d, n_pos), heads)
    stored = stored.reshape(1, heads, d, n_pos).transpose(2, 3)
    cos_h, sin_h = rope_table(1e4, d, n_pos, 1.0, None, torch.device("cpu"), torch.float32, interleaved=False)
    cos_i, sin_i = rope_table(1e4, d, n_pos, 1.0, None, torch.device("cpu"), torch.float32, interleaved=True)
    want = rope(hf, cos_h, sin_h, interleaved=False)
    got = rope(stored, cos_i, sin_i, interleaved=True)
    want_stored = _llama_cpp_permute(want.transpose(2, 3).reshape(heads * d, n_pos), heads)
    torch.testing.assert_close(got, want_stored.reshape(1, heads, d, n_pos).transpose(2, 3))


def test_unsupported_architecture_rejected() -> None:
    from shard.config import ModelConfig

    with pytest.raises(ModelConfigError):
        ModelConfig("gpt2", 1, 8, 2, 2, 4, 16, 10, 32, 1e4, 4, 1e-5, True, False)
