"""A grammar applied to sampling: llguidance's matcher over a GGUF's vocabulary, as a logits mask.

Every engine's vocabulary is llama.cpp's reading of the GGUF (both engines tokenize through it), so
one tokenizer per model file serves the llama.cpp engine, the torch engine and a pipeline's last stage.
"""

from __future__ import annotations

import threading
from pathlib import Path

import llama_cpp
import llguidance
import llguidance.llamacpp
import numpy as np
import torch

from engine.grammar import limits

_tokenizers: dict[str, llguidance.LLTokenizer] = {}
_tokenizers_lock = threading.Lock()


def vocabulary(model_path: str | Path) -> llguidance.LLTokenizer:
    """llguidance's tokenizer for a GGUF, built once per file (about 0.25 s for 49k tokens)."""
    key = str(model_path)
    with _tokenizers_lock:
        if key not in _tokenizers:
            llm = llama_cpp.Llama(model_path=key, vocab_only=True, verbose=False)
            vocab = llm._model.vocab
            n = llama_cpp.llama_vocab_n_tokens(vocab)
            eog = [t for t in range(n) if llama_cpp.llama_vocab_is_eog(vocab, t)]
            _tokenizers[key] = llguidance.llamacpp.lltokenizer_from_vocab(vocab, eos_token=eog)
            # The tokenizer copies the pieces and keeps llama.cpp's tokenize function, which needs the
            # vocab alive: the vocab-only model is kept with it.
            _keep_alive.append(llm)
        return _tokenizers[key]


_keep_alive: list[llama_cpp.Llama] = []


class Constraint:
    """One generation's grammar state: the mask of allowed tokens, advanced by each sampled token."""

    __slots__ = ("_matcher", "_bits", "_n_vocab", "dead_end")

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str) -> None:
        self._matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=limits())
        if self._matcher.is_error():
            raise ValueError(f"grammar: {self._matcher.get_error()}")
        self._n_vocab = tokenizer.vocab_size
        self._bits = np.zeros(((self._n_vocab + 31) // 32,), dtype=np.int32)
        self.dead_end = False  # no token is allowed (or the parser failed): the generation must end

    def mask(self, row: torch.Tensor) -> None:
        """Sets the logits of disallowed tokens to -inf in place (row: [vocab])."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: row.shape[0]]
        if self._matcher.is_error() or not allowed.any():
            self.dead_end = True
            return
        row.masked_fill_(torch.from_numpy(allowed == 0).to(row.device), float("-inf"))

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            self.dead_end = True
