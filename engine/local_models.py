"""The models this node holds, each behind its own EngineRunner, found by alias or digest."""

from __future__ import annotations

from dataclasses import dataclass

from engine.model_file import ModelFile
from engine.runner import EngineRunner
from shard.spec import ShardSpec


@dataclass(frozen=True, slots=True)
class LocalModel:
    model: ModelFile
    runner: EngineRunner
    engine: str  # "llama.cpp" | "torch"
    shard: ShardSpec  # the layers held: the one layer-range type of placement, the wire and adverts

    def __post_init__(self) -> None:
        if self.shard.model_digest != self.model.digest or self.shard.n_layers != self.model.n_layers:
            raise ValueError(f"{self.shard} is not a range of {self.model.alias}")

    @property
    def whole(self) -> bool:
        return self.shard.whole


class LocalModels:
    def __init__(self) -> None:
        self._by_digest: dict[str, LocalModel] = {}

    def add(self, local: LocalModel) -> None:
        if local.model.digest in self._by_digest:
            raise ValueError(f"model {local.model.alias} ({local.model.short_digest}) is loaded twice")
        self._by_digest[local.model.digest] = local

    def remove(self, digest: str) -> LocalModel | None:
        """Takes a model out (an idle range loaded on request); the caller closes its runner."""
        return self._by_digest.pop(digest, None)

    def all(self) -> list[LocalModel]:
        return list(self._by_digest.values())

    def resolve(self, name: str) -> LocalModel | None:
        """By alias, full digest, or a digest prefix of at least 12 hex characters."""
        if name in self._by_digest:
            return self._by_digest[name]
        for local in self._by_digest.values():
            if local.model.alias == name or (len(name) >= 12 and local.model.digest.startswith(name)):
                return local
        return None

    def close(self) -> None:
        for local in self._by_digest.values():
            local.runner.close()
        self._by_digest.clear()
