"""LlamaCppEngine: a whole GGUF model run by llama-cpp-python.

We run llama.cpp's forward pass ourselves (`Llama.eval`, one token at a time after the prompt) and
sample from its logits with `engine/sampling.py`, the sampler every engine uses: so that we own
detokenisation, stop strings, usage, cancellation, logit_bias, log probabilities and grammars.

The KV cache stays between calls and the longest common prefix is reused (what makes prefix-affinity
routing worthwhile), except for a seeded request: llama.cpp computes a prompt's logits differently
(other batch shapes, other kernels) when part of it comes from the cache, so the same seed gave other
text after a request that shared the prompt's prefix. A seeded request therefore prefills from
scratch, unless the cache holds exactly the prompt of the last from-scratch prefill (saved with its
logits): then the saved logits are bitwise what a fresh prefill gives, and `n` choices or repeated
seeded requests share one prefill.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace

import llama_cpp
import numpy as np
import torch

from core.errors import BadRequest
from core.types import EmbedInput
from engine.chat_template import PromptPart, chat_prompt_parts
from engine.constraint import vocabulary
from engine.model_file import ModelFile
from engine.prompt_ids import checked_ids, continuation_ids
from engine.sampling import SamplerState, sample
from engine.token_output import TokenOutput
from engine.types import Chunk, ContextLengthExceeded, EngineLoadError, GenerationRequest, check_context


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """llama.cpp prints load logs straight to fd 2 from C; hide them unless MESHLLM_DEBUG is set."""
    if os.environ.get("MESHLLM_DEBUG"):
        yield
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate such as \ud800: JSON allows it, UTF-8 does not
        raise BadRequest("text must be valid Unicode (no lone surrogates)") from None


class _Pieces:
    """Incremental UTF-8 text of llama.cpp tokens (a character split across tokens comes out whole)."""

    def __init__(self, llm: llama_cpp.Llama) -> None:
        self._llm = llm
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._utf8.decode(self._llm.detokenize([token], special=False))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class _EndOfGeneration:
    def __init__(self, is_eog: Callable[[int], bool]) -> None:
        self._is_eog = is_eog

    def __contains__(self, token: object) -> bool:
        return isinstance(token, int) and self._is_eog(token)


class _Detokenizer:
    """llama.cpp's vocabulary seen as TokenOutput's Detokenizer."""

    def __init__(self, llm: llama_cpp.Llama, is_eog: Callable[[int], bool]) -> None:
        self._llm = llm
        self.eog_ids = _EndOfGeneration(is_eog)

    def stream(self) -> _Pieces:
        return _Pieces(self._llm)

    def token_bytes(self, token: int) -> bytes:
        return self._llm.detokenize([token], special=False)


class LlamaCppEngine:
    engine_name = "llama.cpp"

    def __init__(self, model: ModelFile, *, n_ctx: int | None = None, threads: int | None = None) -> None:
        self.model = model
        self.n_ctx = min(n_ctx or model.context_length, model.context_length)
        self._threads = threads or max(1, os.cpu_count() or 1)
        self._lock = threading.Lock()  # one llama context runs one sequence at a time
        self._embed_lock = threading.Lock()
        self._embedder: llama_cpp.Llama | None = None
        self._llm = self._load(embedding=False, n_ctx=self.n_ctx)
        self._n_vocab = self._llm.n_vocab()
        # The prompt of the last from-scratch prefill and its last logits (see the module docstring).
        self._fresh: tuple[list[int], np.ndarray] | None = None
        vocab = self._llm._model.vocab
        self._eog = lambda tok: bool(llama_cpp.llama_vocab_is_eog(vocab, tok))
        self.bos_token = self._token_text(self._llm.token_bos())
        self.eos_token = self._token_text(self._llm.token_eos())

    def _load(self, *, embedding: bool, n_ctx: int) -> llama_cpp.Llama:
        kwargs: dict = {}
        if embedding:
            kwargs["pooling_type"] = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        try:
            with _quiet_stderr():
                return llama_cpp.Llama(
                    model_path=self.model.path,
                    n_ctx=n_ctx,
                    n_batch=min(512, n_ctx),
                    n_threads=self._threads,
                    n_threads_batch=self._threads,
                    embedding=embedding,
                    verbose=False,
                    **kwargs,
                )
        except (ValueError, RuntimeError) as e:
            raise EngineLoadError(f"llama.cpp could not load {self.model.path}: {e}") from None

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def prompt_parts(self, request: GenerationRequest) -> list[PromptPart]:
        """A raw completion prompt is the client's own markup (special tokens parsed, as llama.cpp's
        server does); chat messages and a continuation are text (see `chat_prompt_parts`)."""
        if request.prompt is not None:
            parts: list[PromptPart] = [(request.prompt, True)]
            return parts + [(request.continuation, False)] if request.continuation else parts
        assert request.messages is not None
        return chat_prompt_parts(
            self.model.chat_template, request.messages, bos_token=self.bos_token, eos_token=self.eos_token,
            continuation=request.continuation,
        )

    def tokenize_parts(self, parts: list[PromptPart]) -> list[int]:
        add_bos = self._llm._model.add_bos_token()
        tokens: list[int] = []
        for i, (text, markup) in enumerate(parts):
            first = i == 0 and add_bos and not (markup and self.bos_token and text.startswith(self.bos_token))
            tokens += self._llm.tokenize(_utf8(text), add_bos=first, special=markup)
        return tokens

    def tokenize(self, text: str) -> list[int]:
        """Client text: no special-token parsing."""
        return self._llm.tokenize(_utf8(text), add_bos=self._llm._model.add_bos_token(), special=False)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        if request.prompt_ids is not None:  # the client's ids as they are; a continuation follows as text
            tail = self._llm.tokenize(_utf8(request.continuation), add_bos=False, special=False)
            return checked_ids(request.prompt_ids, self._n_vocab) + (tail if request.continuation else [])
        return self.tokenize_parts(self.prompt_parts(request))

    def prepare(self, request: GenerationRequest) -> tuple[list[int], int]:
        """Tokenises the prompt and checks the context; returns (prompt tokens, max new tokens)."""
        tokens = self.prompt_tokens(request)
        if not tokens:
            raise BadRequest("the prompt is empty", param="prompt")
        return tokens, check_context(self.n_ctx, len(tokens), request.params.max_tokens)

    def generate(self, request: GenerationRequest, cancel: threading.Event) -> Iterator[Chunk]:
        tokens, max_new = self.prepare(request)
        p = request.params
        vocab = vocabulary(self.model.path) if p.grammar is not None else None
        state = SamplerState(p, vocabulary=vocab)
        if state.constraint is not None and request.continuation:
            # Resumed after a holder failed mid-answer: the grammar continues from the text already
            # sent (a JSON object half written), not from its start.
            state.resume(continuation_ids(tokens, self.prompt_tokens(replace(request, continuation=""))))
        with self._lock:
            logits, cached = self._prefill(tokens, reuse=p.seed is None)
            output = TokenOutput(_Detokenizer(self._llm, self._eog), p.stop, len(tokens), max_new, cached_tokens=cached)
            while not cancel.is_set():
                token = sample([state], logits[None])[0]
                chunk = output.push_sampled(token, state)  # EOS, stop strings, max_tokens: as the torch engines
                yield chunk
                if chunk.finish_reason is not None:
                    return
                self._llm.eval([token])
                logits = self._last_logits()

    def _last_logits(self) -> torch.Tensor:
        """The logits of the last evaluated position, copied out of llama.cpp's buffer: [vocab]."""
        ptr = llama_cpp.llama_get_logits_ith(self._llm._ctx.ctx, -1)
        view = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self._n_vocab,))
        return torch.from_numpy(view.copy())

    def _prefill(self, tokens: list[int], *, reuse: bool) -> tuple[torch.Tensor, int]:
        """Evaluates the prompt, reusing the cache's common prefix when `reuse`; returns the last
        position's logits and how many prompt tokens came from the cache."""
        llm = self._llm
        cached = list(llm._input_ids[: len(tokens)])
        if self._fresh is not None and self._fresh[0] == tokens and cached == tokens:
            llm.n_tokens = len(tokens)  # the next eval drops the KV beyond the prompt
            return torch.from_numpy(self._fresh[1].copy()), len(tokens)
        keep = 0
        if reuse:
            while keep < len(cached) and cached[keep] == tokens[keep]:
                keep += 1
            keep = min(keep, len(tokens) - 1)  # at least one token is evaluated, for its logits
        if self._fresh is not None and keep < len(self._fresh[0]):
            self._fresh = None  # positions of the saved prompt are about to be recomputed
        llm.n_tokens = keep
        llm.eval(tokens[keep:])
        logits = self._last_logits()
        if keep == 0:
            self._fresh = (list(tokens), logits.numpy().copy())
        return logits, keep

    def embed(self, texts: list[EmbedInput]) -> list[list[float]]:
        with self._embed_lock:
            if self._embedder is None:
                # A second context over the same mmapped weights: embeddings need a context created
                # with embeddings on and mean pooling, which generation must not use.
                self._embedder = self._load(embedding=True, n_ctx=min(self.n_ctx, 2048))
            out: list[list[float]] = []
            for text in texts:
                if isinstance(text, tuple):  # token ids of this model's vocabulary
                    tokens = checked_ids(text, self._n_vocab, "input")
                else:
                    tokens = self._embedder.tokenize(_utf8(text), add_bos=True, special=False)
                if not tokens:
                    # llama-cpp-python's embed would write logits[-1] of an empty batch: heap corruption.
                    raise BadRequest("an embedding input has no tokens", param="input")
                if len(tokens) > self._embedder.n_ctx():
                    raise ContextLengthExceeded(
                        f"input has {len(tokens)} tokens; embeddings take at most {self._embedder.n_ctx()}"
                    )
                if isinstance(text, tuple):
                    out.append(_embed_ids(self._embedder, tokens))
                else:
                    out.append(self._embedder.embed(text, normalize=True))
            return out

    def close(self) -> None:
        with self._lock:
            self._llm.close()
        with self._embed_lock:
            if self._embedder is not None:
                self._embedder.close()


def _embed_ids(llm: llama_cpp.Llama, tokens: list[int]) -> list[float]:
    """`Llama.embed` for token ids (it takes text only): one sequence, every token an output, the
    context's mean pooling, L2-normalised as `embed(normalize=True)`."""
    if len(tokens) > llm.n_batch:
        raise ContextLengthExceeded(f"input has {len(tokens)} token ids; embeddings take at most {llm.n_batch}")
    llm._batch.reset()
    llm._ctx.kv_cache_clear()
    try:
        llm._batch.add_sequence(tokens, 0, True)
        llm._ctx.decode(llm._batch)
        ptr = llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, 0)
        vector = np.array(ptr[: llm.n_embd()], dtype=np.float64)
    finally:
        llm._batch.reset()
        llm._ctx.kv_cache_clear()
        llm.reset()
    norm = float(np.linalg.norm(vector))
    return (vector / norm if norm > 0 else vector).tolist()
