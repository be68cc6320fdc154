"""An OpenAI-compatible server the user already runs (vLLM, SGLang, llama-server, Ollama, ...) as an engine.

`UpstreamClient` speaks HTTP to one upstream (aiohttp, one connection pool, bounded timeouts and sizes);
`UpstreamEngine` is one of its models: it relays a generation (`astream`) or embeddings (`aembed`) and
turns the answer into `Chunk`s (`upstream_chunks.py`). The upstream's bytes are hostile: every line,
event and body is capped, a silent upstream times out, and whatever it answers becomes a
`core.errors.MeshError` carrying its message (garbage: `Unavailable`, a clean 502 at the gateway).

It runs on the event loop, not on worker threads: `UpstreamRunner` (`upstream_runner.py`) admits
requests like any runner and awaits the stream directly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from core.errors import BadRequest, MeshError, Refused, Unavailable
from core.types import Chunk, GenerationRequest
from engine.model_file import ModelFile
from engine.upstream_chunks import AnswerReader, BadEvent, request_body
from engine.upstream_signals import CONTINUING_KINDS, Signals, clean_message, error_for, error_message

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 1 << 20  # one SSE line
MAX_ERROR_BYTES = 64 << 10
MAX_PROBE_BYTES = 4 << 20  # /v1/models, /metrics, /slots, /api/ps
MAX_EMBED_VECTORS = 256


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One upstream of a node (`--upstream URL`, with its key, model filter, limit and timeouts)."""

    url: str
    api_key: str = ""
    models: tuple[str, ...] = ()  # served names to advertise; empty: all it lists
    concurrency: int = 8  # generations in flight at the upstream from this node, at most
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 120.0  # the longest silence: before the first token and between chunks
    poll_s: float = 1.0  # how often its models and load are read (a down upstream leaves the advert)
    max_response_bytes: int = 64 << 20  # one answer, streamed or not

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--upstream wants an http(s) URL, got {self.url[:200]!r}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("--upstream: give the key with --upstream-key, not in the URL")
        if self.concurrency < 1:
            raise ValueError("--upstream-concurrency must be >= 1")
        if not (0 < self.connect_timeout_s <= 600 and 0 < self.read_timeout_s <= 3600 and 0.05 <= self.poll_s <= 60):
            raise ValueError("upstream timeouts must be positive (connect <= 600 s, read <= 3600 s)")
        if self.api_key and (len(self.api_key) > 4096 or not self.api_key.isprintable()):
            raise ValueError("--upstream-key must be printable")

    @property
    def base(self) -> str:
        """The server's root: a URL given with /v1 (as OpenAI clients take it) loses it."""
        return self.url.rstrip("/").removesuffix("/v1")


class UpstreamDown(Exception):
    """The upstream cannot be reached or does not answer its model list. `refused`: nothing listens
    there (connection refused or reset), as opposed to a timeout or an error answer."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class UpstreamClient:
    """HTTP to one upstream. Create and use on the event loop."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None
        self.kind: str | None = None  # vllm, ..., openai: detected by the manager (node/upstream.py); None until then
        self.signals: dict[str, Signals] = {}  # served name -> latest reading
        self.last_heard = 0.0  # monotonic time a generation last sent or received bytes (a sign of life)

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
            self._session = aiohttp.ClientSession(
                headers=headers,
                connector=aiohttp.TCPConnector(limit=self.config.concurrency + 4),
                read_bufsize=MAX_LINE_BYTES,
                max_line_size=16 << 10,
                max_field_size=16 << 10,
                auto_decompress=False,
                trust_env=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _timeout(self) -> aiohttp.ClientTimeout:
        c = self.config
        return aiohttp.ClientTimeout(total=None, connect=c.connect_timeout_s, sock_connect=c.connect_timeout_s,
                                     sock_read=c.read_timeout_s)

    # --- probes (the manager's poll) -----------------------------------------------------------------
    async def get(self, path: str, timeout_s: float) -> tuple[int, bytes]:
        """A small GET: (status, body up to MAX_PROBE_BYTES). Raises UpstreamDown when unreachable."""
        try:
            async with asyncio.timeout(timeout_s):
                async with self.session().get(self.config.base + path, allow_redirects=False) as resp:
                    return resp.status, await _read_capped(resp, MAX_PROBE_BYTES)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
            refused = isinstance(e, (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError,
                                     ConnectionError)) and not isinstance(e, TimeoutError)
            raise UpstreamDown(f"{path}: {type(e).__name__}: {e}"[:300], refused) from None

    async def get_json(self, path: str, timeout_s: float) -> Any:
        status, body = await self.get(path, timeout_s)
        if status != 200:
            raise UpstreamDown(f"{path} answered {status}: {error_message(body)}")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise UpstreamDown(f"{path} is not JSON") from None

    # --- generation and embeddings -------------------------------------------------------------------
    async def stream(self, path: str, body: dict[str, Any], chat: bool) -> AsyncIterator[Chunk]:
        """POSTs `body` and yields the answer's chunks (the last with finish reason and usage)."""
        reader = AnswerReader(chat)
        self.last_heard = time.monotonic()
        try:
            async with self.session().post(self.config.base + path, json=body, timeout=self._timeout(),
                                           allow_redirects=False) as resp:
                if resp.status >= 400:
                    raise error_for(resp.status, error_message(await _read_capped(resp, MAX_ERROR_BYTES, strict=False)),
                                    resp.headers.get("Retry-After"))
                if resp.status != 200:
                    raise Unavailable(f"upstream answered {resp.status}", code="upstream_error")
                if resp.content_type == "text/event-stream":  # asked for, or sent anyway
                    async for chunk in self._events(resp, reader):
                        yield chunk
                else:
                    whole = _whole(reader, await _read_capped(resp, self.config.max_response_bytes))
                    if whole is not None:
                        yield whole
        except MeshError:
            raise
        except BadEvent as e:
            raise Unavailable(f"upstream sent a malformed answer ({e})", code="upstream_error") from None
        except TimeoutError:
            raise Unavailable(f"upstream was silent for {self.config.read_timeout_s:g} s",
                              code="upstream_timeout") from None
        except (aiohttp.ClientError, OSError, ValueError) as e:
            raise Unavailable(f"upstream failed: {type(e).__name__}: {clean_message(str(e))[:200]}",
                              code="upstream_error") from None
        for chunk in reader.end():
            yield chunk

    async def _events(self, resp: aiohttp.ClientResponse, reader: AnswerReader) -> AsyncIterator[Chunk]:
        total = 0
        done = False
        while not done:
            line = await resp.content.readline()  # ValueError beyond MAX_LINE_BYTES (read_bufsize)
            if not line:
                break
            self.last_heard = time.monotonic()
            total += len(line)
            if total > self.config.max_response_bytes:
                raise Unavailable(f"upstream answer larger than {self.config.max_response_bytes} bytes",
                                  code="upstream_error")
            if not line.endswith(b"\n") and len(line) >= MAX_LINE_BYTES:
                raise Unavailable("upstream sent a line longer than 1 MiB", code="upstream_error")
            text = line.strip()
            if not text or text.startswith((b":", b"event:", b"id:", b"retry:")):
                continue
            if not text.startswith(b"data:"):
                raise BadEvent("not a server-sent event")
            data = text[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            try:
                obj = json.loads(data)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise BadEvent("an event that is not JSON") from None
            if isinstance(obj, dict) and "error" in obj and "choices" not in obj:
                raise Unavailable(f"upstream failed mid-answer: {error_message(data)}", code="upstream_error")
            chunk = reader.event(obj)
            if chunk is not None:
                yield chunk
        if reader.finish is None:
            # A bare [DONE] is an interrupted answer (llama-cpp-python ends the stream in progress so
            # when another request arrives): a truncated answer must not pass for a whole one.
            raise Unavailable("upstream closed the stream before the answer ended" if not done else
                              "upstream ended the stream without a finish reason (interrupted)", code="upstream_error")

    async def embed(self, served_name: str, inputs: list[Any]) -> tuple[list[list[float]], int]:
        body = {"model": served_name, "input": [list(t) if isinstance(t, tuple) else t for t in inputs]}
        try:
            async with self.session().post(self.config.base + "/v1/embeddings", json=body, timeout=self._timeout(),
                                           allow_redirects=False) as resp:
                raw = await _read_capped(resp, self.config.max_response_bytes, strict=resp.status < 400)
                if resp.status >= 400:
                    raise error_for(resp.status, error_message(raw), resp.headers.get("Retry-After"))
                obj = json.loads(raw)
        except MeshError:
            raise
        except TimeoutError:
            raise Unavailable(f"upstream was silent for {self.config.read_timeout_s:g} s",
                              code="upstream_timeout") from None
        except (aiohttp.ClientError, OSError, ValueError, RecursionError) as e:
            raise Unavailable(f"upstream embeddings failed: {type(e).__name__}", code="upstream_error") from None
        return _vectors(obj, len(inputs))


async def _read_capped(resp: aiohttp.ClientResponse, cap: int, strict: bool = True) -> bytes:
    """The body, at most `cap` bytes: beyond that, ValueError (strict) or the first `cap` bytes."""
    out = bytearray()
    async for piece in resp.content.iter_chunked(64 << 10):
        out += piece
        if len(out) > cap:
            if strict:
                raise ValueError(f"answer larger than {cap} bytes")
            return bytes(out[:cap])
    return bytes(out)


def _whole(reader: AnswerReader, raw: bytes) -> Chunk | None:
    """A non-streamed answer (or an upstream that ignored `stream`)."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadEvent("a body that is not JSON") from None
    return reader.event(obj)


def _vectors(obj: Any, n: int) -> tuple[list[list[float]], int]:
    data = obj.get("data") if isinstance(obj, dict) else None
    if not isinstance(data, list) or len(data) != n or n > MAX_EMBED_VECTORS:
        raise Unavailable("upstream embeddings: not one vector per input", code="upstream_error")
    vectors: list[list[float]] = []
    for item in sorted((d for d in data if isinstance(d, dict)), key=lambda d: d.get("index", 0)
                       if type(d.get("index", 0)) is int else 0):
        v = item.get("embedding")
        if not (isinstance(v, list) and 0 < len(v) <= 65536 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
            raise Unavailable("upstream embeddings: a vector is not a list of numbers", code="upstream_error")
        vectors.append([float(x) for x in v])
    if len(vectors) != n:
        raise Unavailable("upstream embeddings: not one vector per input", code="upstream_error")
    usage = obj.get("usage")
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else 0
    return vectors, tokens if type(tokens) is int and tokens >= 0 else 0


class UpstreamEngine:
    """One model of an upstream. `model` is a ModelFile-shaped record: the upstream id in place of a
    digest, one "layer" (it is only ever held whole), the served name as alias."""

    engine_name = "upstream"

    def __init__(self, client: UpstreamClient, served_name: str, model_id: str, context_length: int) -> None:
        self.client = client
        self.served_name = served_name
        self.n_ctx = context_length
        self.model = ModelFile(path=client.config.base, digest=model_id, alias=served_name, architecture="upstream",
                               n_layers=1, hidden_size=0, context_length=context_length, vocab_size=0,
                               chat_template=None, size_bytes=0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_embed_tokens = 0

    @property
    def signals(self) -> Signals:
        return self.client.signals.get(self.served_name, Signals())

    def astream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        chat = request.messages is not None
        if chat and request.continuation and self.client.kind not in CONTINUING_KINDS:
            # it would answer the final assistant message anew: the client would get the answer twice.
            # Refused: this holder is healthy and is not backed off for it (another may continue)
            raise Refused(f"this upstream ({self.client.kind}) cannot continue an answer")
        try:
            body, _ = request_body(request, self.served_name)
        except (ValueError, RecursionError):
            raise BadRequest("the request body could not be relayed") from None
        return self.client.stream("/v1/chat/completions" if chat else "/v1/completions", body, chat)

    async def aembed(self, inputs: list[Any]) -> tuple[list[list[float]], int]:
        return await self.client.embed(self.served_name, inputs)

    # --- the blocking Engine protocol, for callers on worker threads (embeddings through runner.run) --
    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def embed(self, texts: list[Any]) -> list[list[float]]:
        if self._loop is None:
            raise Unavailable("upstream engine not bound to a loop")
        vectors, tokens = asyncio.run_coroutine_threadsafe(self.aembed(texts), self._loop).result()
        self._last_embed_tokens = tokens
        return vectors

    def count_tokens(self, text: Any) -> int:
        # the upstream counts; its total for the last call is given to the first input, 0 to the rest
        tokens, self._last_embed_tokens = self._last_embed_tokens, 0
        return tokens

    def generate(self, request: GenerationRequest, cancel: Any) -> Any:
        raise Unavailable("the upstream engine streams on the event loop (UpstreamRunner)")

    def close(self) -> None:
        pass  # the client (one per upstream) is closed by its manager

