"""Loading layer ranges of the real SmolLM2 GGUF: only the range's tensors, ends handled, Q/K layout."""

import pytest
import torch

from engine.model_file import load_model_file
from shard.config import ModelConfigError
from shard.loader import ShardLoadError, load_shard, read_model_config, unpermute_rows
from shard.spec import ShardSpec


@pytest.fixture(scope="module")
def model():
    return load_model_file("smollm2-135m-instruct")


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
    assert c.tied_embeddings and not c.attn_bias and c.permuted_qk


def test_first_stage_has_embedding_only(model) -> None:
    w = load_shard(model.path, ShardSpec(model.digest, 0, 2, 30))
    assert len(w.layers) == 2 and w.tok_embd is not None and w.tok_embd.shape == (49152, 576)
    assert w.output is None and w.output_norm is None
    assert w.layers[0].wq.dtype == torch.float32 and w.layers[0].wk.shape == (192, 576)


def test_tied_last_stage_loads_token_embd_as_head(model) -> None:
    w = load_shard(model.path, ShardSpec(model.digest, 28, 30, 30), dtype=torch.bfloat16)
    assert len(w.layers) == 2 and w.tok_embd is None
    assert w.output is not None and w.output.shape == (49152, 576) and w.output.dtype == torch.bfloat16
    first = load_shard(model.path, ShardSpec(model.digest, 0, 1, 30), dtype=torch.bfloat16)
    assert torch.equal(w.output, first.tok_embd)


def test_spec_must_match_layer_count(model) -> None:
    with pytest.raises(ShardLoadError):
        load_shard(model.path, ShardSpec(model.digest, 0, 2, 31))


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # convert_hf_to_gguf.py LlamaModel.permute, verbatim in torch
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize(("rows", "heads"), [(576, 9), (192, 3), (8, 2)])
def test_unpermute_inverts_converter(rows: int, heads: int) -> None:
    w = torch.randn(rows, 5)
    assert torch.equal(unpermute_rows(_llama_cpp_permute(w, heads), heads), w)
    b = torch.randn(rows)
    assert torch.equal(unpermute_rows(_llama_cpp_permute(b, heads), heads), b)


def test_unpermuted_rows_rotate_like_adjacent_pairs() -> None:
    # HF rotate_half on un-permuted rows == llama.cpp adjacent-pair rotation on stored rows
    d = 8
    hf = torch.arange(d, dtype=torch.float32)
    stored = _llama_cpp_permute(hf[:, None], 1)[:, 0]
    assert torch.equal(stored[0::2], hf[: d // 2]) and torch.equal(stored[1::2], hf[d // 2 :])


def test_unsupported_architecture_rejected() -> None:
    from shard.config import ModelConfig

    with pytest.raises(ModelConfigError):
        ModelConfig("gpt2", 1, 8, 2, 2, 4, 16, 10, 32, 1e4, 4, 1e-5, True, False)
