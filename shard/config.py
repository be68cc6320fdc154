"""Model hyper-parameters read from GGUF metadata (Llama family: llama, mistral, qwen2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # placement and simulations import this module; keep it free of numpy/gguf
    import gguf

# Architectures whose GGUF Q/K rows were permuted by llama.cpp's converter for its adjacent-pair
# ("NORM") RoPE. Qwen2 uses NEOX RoPE, i.e. HF's rotate_half, so its weights are stored as in HF.
PERMUTED_QK_ARCHS = frozenset({"llama", "mistral"})
SUPPORTED_ARCHS = PERMUTED_QK_ARCHS | {"qwen2"}


class ModelConfigError(ValueError):
    """The GGUF is not a model this engine can run."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_size: int
    vocab_size: int
    context_length: int
    rope_base: float
    rope_dim: int
    rms_eps: float
    tied_embeddings: bool  # no output.weight: the head reuses token_embd
    attn_bias: bool  # Qwen2-style biases on q, k and v

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHS:
            raise ModelConfigError(f"unsupported architecture {self.architecture!r}")
        if self.n_heads % self.n_kv_heads:
            raise ModelConfigError("n_heads must be a multiple of n_kv_heads")
        if self.rope_dim != self.head_dim:
            raise ModelConfigError("partial rotary embeddings are not supported")

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def permuted_qk(self) -> bool:
        return self.architecture in PERMUTED_QK_ARCHS

    def layer_params(self) -> int:
        """Parameters of one transformer block (norms, attention, MLP)."""
        h = self.hidden_size
        attn = h * self.q_size * 2 + h * self.kv_size * 2  # q, o, k, v
        bias = (self.q_size + 2 * self.kv_size) if self.attn_bias else 0
        return 2 * h + attn + bias + 3 * h * self.ffn_size


def _get(reader: gguf.GGUFReader, key: str, default: object = None) -> object:
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ModelConfigError(f"GGUF lacks {key}")
        return default
    return field.contents()


def read_config(reader: gguf.GGUFReader) -> ModelConfig:
    arch = str(_get(reader, "general.architecture"))
    names = {t.name for t in reader.tensors}
    hidden = int(_get(reader, f"{arch}.embedding_length"))  # type: ignore[arg-type]
    n_heads = int(_get(reader, f"{arch}.attention.head_count"))  # type: ignore[arg-type]
    head_dim = int(_get(reader, f"{arch}.attention.key_length", hidden // n_heads))  # type: ignore[arg-type]
    vocab = reader.fields.get(f"{arch}.vocab_size")
    if vocab is not None:
        vocab_size = int(vocab.contents())
    else:
        vocab_size = len(reader.fields["tokenizer.ggml.tokens"].data)
    return ModelConfig(
        architecture=arch,
        n_layers=int(_get(reader, f"{arch}.block_count")),  # type: ignore[arg-type]
        hidden_size=hidden,
        n_heads=n_heads,
        n_kv_heads=int(_get(reader, f"{arch}.attention.head_count_kv", n_heads)),  # type: ignore[arg-type]
        head_dim=head_dim,
        ffn_size=int(_get(reader, f"{arch}.feed_forward_length")),  # type: ignore[arg-type]
        vocab_size=vocab_size,
        context_length=int(_get(reader, f"{arch}.context_length", 2048)),  # type: ignore[arg-type]
        rope_base=float(_get(reader, f"{arch}.rope.freq_base", 10000.0)),  # type: ignore[arg-type]
        rope_dim=int(_get(reader, f"{arch}.rope.dimension_count", head_dim)),  # type: ignore[arg-type]
        rms_eps=float(_get(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),  # type: ignore[arg-type]
        tied_embeddings="output.weight" not in names,
        attn_bias="blk.0.attn_q.bias" in names,
    )
