"""Model hyper-parameters read from GGUF metadata: the Llama family (llama, mistral, qwen2) and gemma3.

Per-architecture facts live here as fields and derived properties (which layers slide, which RoPE base
a layer uses, scales); the forward of each architecture is in engine/arch_<name>.py.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sized
from dataclasses import dataclass

# Architectures whose GGUF Q/K rows were permuted by llama.cpp's converter for its adjacent-pair
# ("NORM") RoPE. Qwen2 uses NEOX RoPE, i.e. HF's rotate_half, so its weights are stored as in HF.
PERMUTED_QK_ARCHS = frozenset({"llama", "mistral"})
SUPPORTED_ARCHS = PERMUTED_QK_ARCHS | {"qwen2", "gemma3"}
# Gemma 3 as llama.cpp runs it (llama-model.cpp, LLM_ARCH_GEMMA3): every 6th layer is global, the
# others attend over a sliding window with their own RoPE base (hard-coded, not in the GGUF).
GEMMA3_SWA_PATTERN = 6
GEMMA3_SWA_ROPE_BASE = 10000.0


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
    # sliding-window attention: a key is masked when query_pos - key_pos >= sliding_window (0: none);
    # with swa_pattern N, layer i is global when i % N == N - 1 and sliding otherwise
    sliding_window: int = 0
    swa_pattern: int = 0
    rope_base_swa: float = 10000.0  # RoPE base of the sliding layers
    rope_scale: float = 1.0  # linear RoPE scaling factor of the global layers (positions / factor)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHS:
            raise ModelConfigError(f"unsupported architecture {self.architecture!r}")
        if self.n_heads % self.n_kv_heads:
            raise ModelConfigError("n_heads must be a multiple of n_kv_heads")
        if self.rope_dim != self.head_dim:
            raise ModelConfigError("partial rotary embeddings are not supported")
        if self.sliding_window < 0 or self.swa_pattern < 0 or self.rope_scale <= 0:
            raise ModelConfigError("bad sliding window, pattern or RoPE scale")

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def rope_interleaved(self) -> bool:
        """RoPE on adjacent pairs (x[2i], x[2i+1]), llama.cpp's NORM mode: the layout the converter
        permuted llama/mistral Q/K rows into. Others (qwen2, gemma3) use rotate_half (NEOX)."""
        return self.architecture in PERMUTED_QK_ARCHS

    @property
    def is_gemma3(self) -> bool:
        return self.architecture == "gemma3"

    @property
    def embed_scale(self) -> float:
        """Token embeddings are multiplied by this (Gemma: sqrt(hidden), in fp32 as llama.cpp)."""
        return float(self.hidden_size) ** 0.5 if self.is_gemma3 else 1.0

    @property
    def attn_scale(self) -> float:
        """Softmax scale of q.k. Gemma 3 27B (62 layers) uses hidden / heads, as llama.cpp does."""
        if self.is_gemma3 and self.n_layers == 62:
            return (self.hidden_size / self.n_heads) ** -0.5
        return self.head_dim**-0.5

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` attends over the sliding window only (llama.cpp's set_swa_pattern)."""
        if self.sliding_window == 0 or self.swa_pattern == 0:
            return False
        return layer % self.swa_pattern < self.swa_pattern - 1

    def layer_params(self) -> int:
        """Parameters of one transformer block (norms, attention, MLP)."""
        h = self.hidden_size
        attn = h * self.q_size * 2 + h * self.kv_size * 2  # q, o, k, v
        bias = (self.q_size + 2 * self.kv_size) if self.attn_bias else 0
        extra = (2 * h + 2 * self.head_dim) if self.is_gemma3 else 0  # post-norms, q/k norms
        return 2 * h + attn + bias + extra + 3 * h * self.ffn_size


def _get(fields: Mapping[str, object], key: str, default: object = None) -> object:
    value = fields.get(key)
    if value is None:
        if default is None:
            raise ModelConfigError(f"GGUF lacks {key}")
        return default
    return value


def _int(fields: Mapping[str, object], key: str, default: int | None = None) -> int:
    """A positive integer from the metadata; a file that says otherwise is refused, naming the key."""
    value = _get(fields, key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 1 << 40:
        raise ModelConfigError(f"GGUF {key} is {value!r}, not a positive integer")
    return value


def _float(fields: Mapping[str, object], key: str, default: float | None = None) -> float:
    value = _get(fields, key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        raise ModelConfigError(f"GGUF {key} is {value!r}, not a positive number")
    return float(value)


def read_config(fields: Mapping[str, object], names: Collection[str]) -> ModelConfig:
    """The config from a GGUF's metadata (shard.gguf_header: key -> value) and its tensor names."""
    arch = str(_get(fields, "general.architecture"))
    hidden = _int(fields, f"{arch}.embedding_length")
    n_heads = _int(fields, f"{arch}.attention.head_count")
    head_dim = _int(fields, f"{arch}.attention.key_length", max(1, hidden // n_heads))
    tokens = fields.get("tokenizer.ggml.tokens")
    if f"{arch}.vocab_size" in fields:
        vocab_size = _int(fields, f"{arch}.vocab_size")
    elif isinstance(tokens, Sized) and not isinstance(tokens, str):
        vocab_size = len(tokens)
    else:
        raise ModelConfigError("GGUF has neither a vocab_size nor a tokenizer")
    gemma3 = arch == "gemma3"
    rope_scale = _gemma3_rope_scale(fields) if gemma3 else 1.0
    return ModelConfig(
        architecture=arch,
        n_layers=_int(fields, f"{arch}.block_count"),
        hidden_size=hidden,
        n_heads=n_heads,
        n_kv_heads=_int(fields, f"{arch}.attention.head_count_kv", n_heads),
        head_dim=head_dim,
        ffn_size=_int(fields, f"{arch}.feed_forward_length"),
        vocab_size=vocab_size,
        context_length=_int(fields, f"{arch}.context_length", 2048),
        rope_base=_float(fields, f"{arch}.rope.freq_base", 10000.0),
        rope_dim=_int(fields, f"{arch}.rope.dimension_count", head_dim),
        rms_eps=_float(fields, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        tied_embeddings="output.weight" not in names,
        attn_bias="blk.0.attn_q.bias" in names,
        sliding_window=_int(fields, f"{arch}.attention.sliding_window") if gemma3 else 0,
        swa_pattern=GEMMA3_SWA_PATTERN if gemma3 else 0,
        rope_base_swa=GEMMA3_SWA_ROPE_BASE,
        rope_scale=rope_scale,
    )


def _gemma3_rope_scale(fields: Mapping[str, object]) -> float:
    """Gemma 3 >= 4B scales its global layers' positions linearly (factor 8); 270M and 1B do not."""
    kind = str(_get(fields, "gemma3.rope.scaling.type", "none"))
    if kind not in ("none", "linear"):
        raise ModelConfigError(f"unsupported RoPE scaling {kind!r}")
    return _float(fields, "gemma3.rope.scaling.factor", 1.0) if kind == "linear" else 1.0
