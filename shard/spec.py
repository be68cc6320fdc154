"""ShardSpec: which contiguous layer range of which model a stage holds."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """Layers `[start, end)` of the model whose GGUF has sha256 `model_digest`.

    The first stage (start == 0) also holds the token embedding; the last (end == n_layers) holds
    the output norm and head. A whole model is the shard `[0, n_layers)`.
    """

    model_digest: str
    start: int
    end: int
    n_layers: int

    def __post_init__(self) -> None:
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")
        if not 0 <= self.start < self.end <= self.n_layers:
            raise ValueError(
                f"need 0 <= start < end <= n_layers, got [{self.start}, {self.end}) of {self.n_layers}"
            )

    @classmethod
    def whole_model(cls, model_digest: str, n_layers: int) -> ShardSpec:
        return cls(model_digest, 0, n_layers, n_layers)

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.n_layers

    @property
    def whole(self) -> bool:
        return self.is_first and self.is_last

    @property
    def n_stage_layers(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"{self.model_digest[:12]}[{self.start}:{self.end}]/{self.n_layers}"
