"""TokenOutput: from sampled token ids to streamed text, with EOS, stop strings and max_tokens.

The one token loop's output half, used wherever a model's last layer lives: the llama.cpp engine,
the whole-model torch loop and a pipeline's last stage.
"""

from __future__ import annotations

from collections.abc import Container
from typing import TYPE_CHECKING, Protocol

from engine.stop import StopMatcher
from engine.types import Chunk, FinishReason, TokenLogprob, Usage

if TYPE_CHECKING:
    from engine.sampling import SamplerState


class TextStream(Protocol):
    """Incremental detokenisation: text of each token as soon as its characters are complete."""

    def feed(self, token: int) -> str: ...

    def flush(self) -> str: ...


class Detokenizer(Protocol):
    @property
    def eog_ids(self) -> Container[int]: ...

    def stream(self) -> TextStream: ...

    def token_bytes(self, token: int) -> bytes: ...


class TokenOutput:
    def __init__(
        self, tokenizer: Detokenizer, stops: tuple[str, ...], prompt_len: int, max_new: int, *, cached_tokens: int = 0
    ) -> None:
        self._tokenizer = tokenizer
        self._eog = tokenizer.eog_ids
        self.cached_tokens = cached_tokens
        self._text = tokenizer.stream()
        self._stops = StopMatcher(stops)
        self.prompt_len = prompt_len
        self.max_new = max_new
        self.n_out = 0

    def push(self, token: int) -> Chunk:
        """The chunk for one sampled token; it carries finish_reason and usage when the answer ends."""
        if token in self._eog:
            return self._finish(Chunk(), FinishReason.STOP, flush=True)
        self.n_out += 1
        text, stopped = self._stops.feed(self._text.feed(token))
        chunk = Chunk(text=text, token_ids=[token])
        if stopped:
            return self._finish(chunk, FinishReason.STOP, flush=False)
        if self.n_out >= self.max_new:
            return self._finish(chunk, FinishReason.LENGTH, flush=True)
        return chunk

    def push_sampled(self, token: int, state: SamplerState) -> Chunk:
        """`push`, plus what the sampler knows: a grammar's dead end ends the answer ("length": it
        could not be completed), and the token's log probabilities ride on the chunk."""
        if state.dead_end:
            return self._finish(Chunk(), FinishReason.LENGTH, flush=True)
        chunk = self.push(token)
        if state.last_logprob is not None and chunk.token_ids:
            _, logprob, top = state.last_logprob
            piece = self._tokenizer.token_bytes(token)
            chunk.logprobs = [TokenLogprob(piece, logprob, tuple((self._tokenizer.token_bytes(t), lp) for t, lp in top))]
        return chunk

    def _finish(self, chunk: Chunk, reason: FinishReason, *, flush: bool) -> Chunk:
        if flush:  # EOS or length: held-back text turned out not to start a stop string
            tail, _ = self._stops.feed(self._text.flush())
            chunk.text += tail + self._stops.flush()
        chunk.finish_reason = reason
        chunk.usage = Usage(self.prompt_len, self.n_out, self.cached_tokens)
        return chunk
