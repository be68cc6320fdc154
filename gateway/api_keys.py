"""API keys: who may use /v1/*, which models each key may name, and how often it may ask.

Keys come from `--api-key KEY` (any model, no limit) and from a keys file, one key a line:

    # comment
    sk-team-a                                  any model, no limit
    sk-team-b  models=smollm2-135m-instruct    only these models (comma-separated aliases or digests)
    sk-bot     models=a,b  rpm=30              and at most 30 requests a minute

Keys are compared in constant time (over sha256 digests, so a key's length is not timed either).
"""

from __future__ import annotations

import hashlib
import hmac
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

WINDOW_S = 60.0
MAX_KEYS = 10_000


@dataclass(frozen=True, slots=True)
class ApiKey:
    digest: bytes  # sha256 of the key; the key itself is not kept
    label: str  # for logs: the key's first 4 characters
    models: frozenset[str] | None = None  # None: any model
    rpm: int | None = None  # requests per minute; None: no limit

    def allows(self, names: Iterable[str]) -> bool:
        """True when any of the names a model goes by (alias, digest) is on this key's list."""
        return self.models is None or any(n in self.models for n in names)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _valid_key(key: str) -> bool:
    return 0 < len(key) <= 256 and key.isprintable() and not any(c.isspace() for c in key)


def parse_key_line(line: str, where: str) -> ApiKey | None:
    words = line.split("#", 1)[0].split()
    if not words:
        return None
    key, options = words[0], words[1:]
    if not _valid_key(key):
        raise ValueError(f"{where}: an API key must be 1 to 256 printable characters without spaces")
    models: frozenset[str] | None = None
    rpm: int | None = None
    for option in options:
        name, eq, value = option.partition("=")
        if name == "models" and eq and value:
            models = frozenset(m for m in value.split(",") if m)
        elif name == "rpm" and eq and value.isdigit() and int(value) > 0:
            rpm = int(value)
        else:
            raise ValueError(f"{where}: unknown option {option!r} (want models=A,B or rpm=N)")
    return ApiKey(_digest(key), key[:4], models, rpm)


class ApiKeys:
    """The keys of one node, and a sliding-window request count per rate-limited key."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self.keys = tuple(keys)
        if len(self.keys) > MAX_KEYS:
            raise ValueError(f"at most {MAX_KEYS} API keys")
        self._recent: dict[bytes, deque[float]] = {k.digest: deque() for k in self.keys if k.rpm}

    @classmethod
    def load(cls, keys: Iterable[str] = (), keys_file: Path | None = None) -> ApiKeys:
        """Raises ValueError, naming the file and line, on anything it cannot read."""
        found = [ApiKey(_digest(k), k[:4]) for k in keys if _valid_key(k)]
        if keys_file is not None:
            try:
                text = Path(keys_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"cannot read the API keys file {keys_file}: {e}") from None
            for n, line in enumerate(text.splitlines(), 1):
                if (key := parse_key_line(line, f"{keys_file}:{n}")) is not None:
                    found.append(key)
            if not found:
                raise ValueError(f"the API keys file {keys_file} holds no key")
        return cls(found)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def match(self, presented: str) -> ApiKey | None:
        """The key presented, or None; every key is compared, so the time says nothing."""
        digest = _digest(presented)
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.digest, digest):
                found = key
        return found

    def admit(self, key: ApiKey, now_s: float) -> float | None:
        """None when `key` may make a request now (and counts it), else seconds until it may."""
        if key.rpm is None:
            return None
        recent = self._recent[key.digest]
        while recent and recent[0] <= now_s - WINDOW_S:
            recent.popleft()
        if len(recent) >= key.rpm:
            return recent[0] + WINDOW_S - now_s
        recent.append(now_s)
        return None
