"""TokenOutput: from sampled token ids to streamed text, with EOS, stop strings and max_tokens.

Used wherever a model's last layer lives: the whole-model torch loop and a pipeline's last stage.
"""

from __future__ import annotations

from engine.stop import StopMatcher
from engine.tokenizer import GGUFTokenizer
from engine.types import Chunk, FinishReason, Usage


class TokenOutput:
    def __init__(self, tokenizer: GGUFTokenizer, stops: tuple[str, ...], prompt_len: int, max_new: int) -> None:
        self._tokenizer = tokenizer
        self._text = tokenizer.stream()
        self._stops = StopMatcher(stops)
        self.prompt_len = prompt_len
        self.max_new = max_new
        self.n_out = 0

    def push(self, token: int) -> Chunk:
        """The chunk for one sampled token; it carries finish_reason and usage when the answer ends."""
        if token in self._tokenizer.eog_ids:
            return self._finish(Chunk(), FinishReason.STOP, flush=True)
        self.n_out += 1
        text, stopped = self._stops.feed(self._text.feed(token))
        chunk = Chunk(text=text, token_ids=[token])
        if stopped:
            return self._finish(chunk, FinishReason.STOP, flush=False)
        if self.n_out >= self.max_new:
            return self._finish(chunk, FinishReason.LENGTH, flush=True)
        return chunk

    def _finish(self, chunk: Chunk, reason: FinishReason, *, flush: bool) -> Chunk:
        if flush:  # EOS or length: held-back text turned out not to start a stop string
            tail, _ = self._stops.feed(self._text.flush())
            chunk.text += tail + self._stops.flush()
        chunk.finish_reason = reason
        chunk.usage = Usage(self.prompt_len, self.n_out)
        return chunk
