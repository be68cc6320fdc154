"""LlamaCppEngine: a whole GGUF model run by llama-cpp-python.

We drive `Llama.generate` token by token (not `create_completion`) so that we own detokenisation,
stop strings, usage counts and cancellation, and so that the token ids are visible to tests.
`generate` keeps llama.cpp's KV cache between calls and reuses the longest common prefix, which is
what makes prefix-affinity routing worthwhile.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import random
import threading
from collections.abc import Iterator

import llama_cpp

from engine.chat_template import render_chat
from engine.model_file import ModelFile
from engine.stop import StopMatcher
from engine.types import Chunk, ContextLengthExceeded, EngineLoadError, FinishReason, GenerationRequest, Usage


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

    def render_prompt(self, request: GenerationRequest) -> str:
        if request.prompt is not None:
            return request.prompt + request.continuation
        assert request.messages is not None
        rendered = render_chat(
            self.model.chat_template, request.messages, bos_token=self.bos_token, eos_token=self.eos_token
        )
        return rendered + request.continuation

    def tokenize(self, text: str) -> list[int]:
        # special=True: chat templates contain control tokens such as <|im_start|>.
        add_bos = self._llm._model.add_bos_token()
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def prepare(self, request: GenerationRequest) -> tuple[list[int], int]:
        """Tokenises the prompt and checks the context; returns (prompt tokens, max new tokens)."""
        tokens = self.tokenize(self.render_prompt(request))
        room = self.n_ctx - len(tokens)
        wanted = request.params.max_tokens
        if room <= 0 or (wanted is not None and wanted > room):
            raise ContextLengthExceeded(
                f"this model's context is {self.n_ctx} tokens; the prompt has {len(tokens)} and "
                f"{wanted or 1} more were requested"
            )
        return tokens, wanted or room

    def generate(self, request: GenerationRequest, cancel: threading.Event) -> Iterator[Chunk]:
        tokens, max_new = self.prepare(request)
        p = request.params
        stop = StopMatcher(p.stop)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        n_out = 0
        finish = FinishReason.LENGTH
        hit = False
        with self._lock:
            self._llm.set_seed(p.seed if p.seed is not None else random.getrandbits(31))
            stream = self._llm.generate(
                tokens,
                temp=p.temperature,
                top_k=p.top_k,
                top_p=p.top_p,
                min_p=p.min_p,
                repeat_penalty=1.0,
                presence_penalty=p.presence_penalty,
                frequency_penalty=p.frequency_penalty,
                reset=True,
            )
            try:
                for token in stream:
                    if cancel.is_set():
                        return
                    if self._eog(token):
                        finish = FinishReason.STOP
                        break
                    n_out += 1
                    piece = decoder.decode(self._llm.detokenize([token], special=False))
                    text, hit = stop.feed(piece)
                    yield Chunk(text=text, token_ids=[token])
                    if hit:
                        finish = FinishReason.STOP
                        break
                    if n_out >= max_new:
                        break
            finally:
                stream.close()
        # Text held back as a possible stop-string start, or an incomplete UTF-8 tail, is real output
        # unless a stop string was hit (then whatever follows the stop is dropped).
        tail = "" if hit else stop.flush() + decoder.decode(b"", final=True)
        yield Chunk(text=tail, finish_reason=finish, usage=Usage(len(tokens), n_out))

    def embed(self, texts: list[str]) -> list[list[float]]:
        with self._embed_lock:
            if self._embedder is None:
                # A second context over the same mmapped weights: embeddings need a context created
                # with embeddings on and mean pooling, which generation must not use.
                self._embedder = self._load(embedding=True, n_ctx=min(self.n_ctx, 2048))
            out: list[list[float]] = []
            for text in texts:
                tokens = self._embedder.tokenize(text.encode("utf-8"), add_bos=True, special=False)
                if len(tokens) > self._embedder.n_ctx():
                    raise ContextLengthExceeded(
                        f"input has {len(tokens)} tokens; embeddings take at most {self._embedder.n_ctx()}"
                    )
                out.append(self._embedder.embed(text, normalize=True))  # type: ignore[arg-type]
            return out

    def close(self) -> None:
        with self._lock:
            self._llm.close()
        with self._embed_lock:
            if self._embedder is not None:
                self._embedder.close()
