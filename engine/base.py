"""The Engine protocol: what the node needs from anything that runs a model."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Protocol

from core.types import EmbedInput
from engine.model_file import ModelFile
from engine.types import Chunk, GenerationRequest


class Engine(Protocol):
    """A loaded model. Methods block and are called from worker threads, never on the event loop.

    `generate` yields chunks and must return soon after `cancel` is set; the engine serialises
    calls itself if it cannot run two at once.
    """

    model: ModelFile

    def generate(self, request: GenerationRequest, cancel: threading.Event) -> Iterator[Chunk]: ...

    def embed(self, texts: list[EmbedInput]) -> list[list[float]]: ...

    def count_tokens(self, text: str) -> int: ...

    def close(self) -> None: ...
