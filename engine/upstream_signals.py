"""What an OpenAI-compatible upstream tells us, read as plain data (pure; no I/O).

- which models it serves and their stable identity (`upstream:<kind>:<fingerprint>:<name>`);
- which kind of server it is (vLLM, SGLang, llama-server, Ollama, or any other OpenAI server);
- how busy it is, from its own signals: vLLM/SGLang/llama-server Prometheus `/metrics`, llama-server
  `/slots`, Ollama `/api/ps`;
- its error bodies, turned into `core.errors` with the upstream's own message.

Everything here reads hostile bytes: types are checked, sizes capped, nothing is trusted to be there.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from core.errors import BadRequest, Busy, MeshError, Unavailable
from core.types import UPSTREAM_ID_RE

MAX_MODELS = 64
MAX_MESSAGE_CHARS = 1000
_NAME = re.compile(r"[!-~]{1,64}")  # printable ASCII, no spaces: it is an alias and part of the id
_FINGERPRINT_KEYS = ("id", "root", "parent", "max_model_len", "meta", "owned_by", "digest")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


@dataclass(frozen=True, slots=True)
class UpstreamModel:
    name: str  # the served name: what the upstream is asked for, and the mesh alias
    model_id: str  # upstream:<kind>:<fingerprint>:<name>
    context_length: int  # 0 when the upstream does not say


@dataclass(frozen=True, slots=True)
class Signals:
    """One reading of an upstream's load; None where it said nothing."""

    running: int | None = None
    waiting: int | None = None
    kv_usage: float | None = None  # 0..1
    slots: int | None = None  # llama-server: its parallel slots
    cold: frozenset[str] = frozenset()  # Ollama: served names not loaded in memory (a load first)


def upstream_model_id(kind: str, name: str, fingerprint: str) -> str:
    model_id = f"upstream:{kind}:{fingerprint}:{name}"
    if UPSTREAM_ID_RE.fullmatch(model_id) is None:
        raise ValueError(f"not an upstream model id: {model_id[:200]!r}")
    return model_id


def fingerprint(entry: dict[str, Any]) -> str:
    """16 hex characters of sha256 over the entry's stable fields (never `created`, which vLLM sets
    to the time of the request): the same served model on the same kind of server gets the same id on
    every node and across restarts, and a different build of it (another root, context, file) does not."""
    stable = {k: entry[k] for k in _FINGERPRINT_KEYS if k in entry}
    text = json.dumps(stable, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 40 else 0


def parse_models(body: Any, kind: str, only: tuple[str, ...] = (), digests: dict[str, str] | None = None
                 ) -> tuple[list[UpstreamModel], list[str]]:
    """`GET /v1/models` -> (models, skipped names with why). `only`: the names to serve (empty: all);
    `digests`: Ollama's content digests by name (`/api/tags`), folded into the fingerprint."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise ValueError("/v1/models has no 'data' list")
    models: list[UpstreamModel] = []
    skipped: list[str] = []
    for entry in data[:MAX_MODELS]:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        name = entry["id"]
        if only and name not in only:
            continue
        if not _NAME.fullmatch(name):
            skipped.append(f"{name[:64]!r}: a served name must be 1-64 printable ASCII characters without spaces")
            continue
        entry = {**entry, "digest": (digests or {}).get(name, "")}
        raw_meta = entry.get("meta")
        meta = raw_meta if isinstance(raw_meta, dict) else {}
        context = _int(entry.get("max_model_len")) or _int(meta.get("n_ctx_train")) or _int(meta.get("n_ctx"))
        models.append(UpstreamModel(name, upstream_model_id(kind, name, fingerprint(entry)), context))
    return models, skipped


def kind_from_owner(body: Any) -> str | None:
    """vLLM, SGLang and llama-server name themselves in `owned_by` of `/v1/models`."""
    data = body.get("data") if isinstance(body, dict) else None
    owners = {e.get("owned_by") for e in data if isinstance(e, dict)} if isinstance(data, list) else set()
    for owner, kind in (("vllm", "vllm"), ("sglang", "sglang"), ("llamacpp", "llama-server")):
        if owner in owners:
            return kind
    return None


def serial_server(body: Any) -> bool:
    """llama-cpp-python's server (it lists `owned_by: "me"` with empty `permissions`) generates one
    answer at a time and ends the one in progress (a bare `[DONE]`, no finish reason) as soon as any
    other request that touches the model arrives, its own `GET /v1/models` included (its
    `interrupt_requests`, on by default). Such a server is sent one request at a time and not polled
    while a generation is in flight. Its kind stays `openai`: the kind is part of model identities."""
    data = body.get("data") if isinstance(body, dict) else None
    entries = [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []
    return bool(entries) and all(e.get("owned_by") == "me" and e.get("permissions") == [] for e in entries)


# Kinds that continue a final assistant message (a resumed chat stream) rather than answer it anew:
# vLLM and SGLang with `continue_final_message`, llama-server by prefilling the assistant turn.
CONTINUING_KINDS = frozenset({"vllm", "sglang", "llama-server"})


def kind_from_metrics(text: str) -> str | None:
    for prefix, kind in (("vllm:", "vllm"), ("sglang:", "sglang"), ("llamacpp:", "llama-server")):
        if prefix in text:
            return kind
    return None


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfINFaN]+)")
_METRICS = {  # kind -> (running, waiting, kv usage) metric names (older and newer vLLM names both)
    "vllm": (("vllm:num_requests_running",), ("vllm:num_requests_waiting",),
             ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")),
    "sglang": (("sglang:num_running_reqs",), ("sglang:num_queue_reqs",), ("sglang:token_usage",)),
    "llama-server": (("llamacpp:requests_processing",), ("llamacpp:requests_deferred",),
                     ("llamacpp:kv_cache_usage_ratio",)),
}


def parse_metrics(text: str, kind: str, model: str | None = None) -> Signals:
    """Running and waiting requests and KV usage from Prometheus text, summed over the samples (of
    `model` where samples carry a model_name label)."""
    names = _METRICS.get(kind)
    if names is None:
        return Signals()
    sums: list[float | None] = [None, None, None]
    for line in text.splitlines()[:20000]:
        if not line or line[0] == "#":
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        for i, group in enumerate(names):
            if m.group(1) in group:
                labels = m.group(2) or ""
                if model is not None and "model_name=" in labels and f'model_name="{model}"' not in labels:
                    continue
                try:
                    value = float(m.group(3))
                except ValueError:
                    continue
                if value == value and 0 <= value < 1e9:  # not NaN, in range
                    sums[i] = (sums[i] or 0.0) + value
    running, waiting, kv = sums
    return Signals(
        running=int(running) if running is not None else None,
        waiting=int(waiting) if waiting is not None else None,
        kv_usage=min(1.0, kv) if kv is not None else None,
    )


def parse_slots(body: Any) -> Signals:
    """llama-server `GET /slots`: a list of slots, each `is_processing` (or `state` != 0 in older builds)."""
    if not isinstance(body, list):
        return Signals()
    slots = [s for s in body[:1024] if isinstance(s, dict)]
    busy = sum(1 for s in slots if s.get("is_processing") is True or s.get("state") in (1, 2))
    return Signals(running=busy, waiting=0, slots=len(slots))


def parse_ollama_ps(body: Any, names: list[str]) -> Signals:
    """Ollama `GET /api/ps`: the models loaded in memory; the others need a load before their first token."""
    loaded: set[str] = set()
    models = body.get("models") if isinstance(body, dict) else None
    for m in models[:MAX_MODELS] if isinstance(models, list) else []:
        if isinstance(m, dict):
            for key in ("name", "model"):
                if isinstance(m.get(key), str):
                    loaded.add(m[key])
    return Signals(cold=frozenset(n for n in names if n not in loaded and f"{n}:latest" not in loaded))


def ollama_digests(body: Any) -> dict[str, str]:
    """Ollama `GET /api/tags`: each model's content digest."""
    models = body.get("models") if isinstance(body, dict) else None
    out: dict[str, str] = {}
    for m in models[:MAX_MODELS] if isinstance(models, list) else []:
        if isinstance(m, dict) and isinstance(m.get("digest"), str) and isinstance(m.get("name"), str):
            out[m["name"]] = m["digest"][:128]
            out.setdefault(m["name"].removesuffix(":latest"), m["digest"][:128])
    return out


def clean_message(text: str) -> str:
    """An upstream's words, safe to put in our error body and logs: no control characters, capped."""
    text = _CONTROL.sub(" ", text).strip()
    return text[:MAX_MESSAGE_CHARS] + ("..." if len(text) > MAX_MESSAGE_CHARS else "")


def error_message(body: bytes) -> str:
    """The message of an error body: OpenAI's {"error": {"message"}}, {"error": "..."} (Ollama),
    {"detail": ...} (FastAPI), {"message": ...}, else the text itself."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return clean_message(body[:MAX_MESSAGE_CHARS].decode("utf-8", "replace")) or "(no message)"
    found: Any = None
    if isinstance(obj, dict):
        err = obj.get("error")
        found = err.get("message") if isinstance(err, dict) else err
        found = found if found is not None else obj.get("detail", obj.get("message"))
    if not isinstance(found, str):
        found = json.dumps(found if found is not None else obj)[:MAX_MESSAGE_CHARS]
    return clean_message(found) or "(no message)"


def error_for(status: int, message: str, retry_after: str | None = None) -> MeshError:
    """An upstream's HTTP error in words of the mesh: the client's fault is a 400 (final, not retried);
    busy is a 429 with the upstream's Retry-After; anything else is this holder failing (another holder
    is tried, else 502). The upstream's message is kept."""
    said = f"upstream: {message}"
    if status in (400, 413, 422):
        return BadRequest(said)
    if status in (408, 429, 503):
        seconds = int(retry_after) if retry_after is not None and retry_after.isdigit() else 1
        return Busy(max(1, min(60, seconds)), said)
    if status in (401, 403):
        return Unavailable(f"upstream refused this node's credentials ({status}): {message}", code="upstream_error")
    return Unavailable(f"upstream answered {status}: {message}", code="upstream_error")
