"""The GGUF's own tokenizer through llama.cpp (vocab only), so both engines see the same token ids."""

from __future__ import annotations

import codecs
import ctypes
from pathlib import Path

import llama_cpp

from engine.chat_template import PromptPart

PIECE_BYTES = 256


class GGUFTokenizer:
    """Tokenize / detokenize with llama.cpp's implementation of the GGUF vocabulary."""

    def __init__(self, path: str | Path) -> None:
        self._llama = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        vocab = self._llama._model.vocab  # the public API has no is_eog; this pointer is stable in 0.3.x
        self.vocab_size: int = llama_cpp.llama_vocab_n_tokens(vocab)
        self.bos_id: int = self._llama.token_bos()
        self.eos_id: int = self._llama.token_eos()
        self.add_bos: bool = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        # end-of-generation tokens: eos, eot, <|im_end|> and the like
        self.eog_ids: frozenset[int] = frozenset(
            t for t in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, t)
        )
        self._vocab = vocab

    def token_text(self, token: int, *, special: bool = True) -> str:
        return self.token_bytes(token, special=special).decode("utf-8", errors="replace")

    @property
    def bos_text(self) -> str:
        return self.token_text(self.bos_id) if self.bos_id >= 0 else ""

    @property
    def eos_text(self) -> str:
        return self.token_text(self.eos_id) if self.eos_id >= 0 else ""

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Tokenizes with special tokens parsed (chat templates write them as text).

        BOS is added when the GGUF asks for it, unless the text already starts with it.
        """
        if add_bos is None:
            add_bos = self.add_bos and not (self.bos_id >= 0 and text.startswith(self.bos_text))
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def encode_parts(self, parts: list[PromptPart]) -> list[int]:
        """Tokenizes a chat prompt: special tokens are parsed in the template's markup only, never in
        client text. BOS as in `encode`, judged on the first part."""
        ids: list[int] = []
        for i, (text, markup) in enumerate(parts):
            if i == 0 and markup:
                ids += self.encode(text)
            else:
                ids += self._llama.tokenize(
                    text.encode("utf-8"), add_bos=i == 0 and self.add_bos, special=markup
                )
        return ids

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token; control tokens (eos, im_end) are empty unless `special`."""
        # A buffer per call: generations on several threads detokenise at once (a shared one raced).
        piece = ctypes.create_string_buffer(PIECE_BYTES)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, piece, PIECE_BYTES, 0, special)
        if n < 0:
            raise ValueError(f"token {token} has a piece longer than {PIECE_BYTES} bytes")
        return piece.raw[:n]

    def decode(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)

    def close(self) -> None:
        self._llama.close()


class StreamDecoder:
    """Token-by-token text; a UTF-8 character split across tokens comes out with its last byte."""

    __slots__ = ("_tokenizer", "_utf8")

    def __init__(self, tokenizer: GGUFTokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
