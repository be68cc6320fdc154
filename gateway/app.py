"""The OpenAI-compatible HTTP API (aiohttp). Any node serves it for any model its backend can reach."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from core.errors import MeshError
from core.serving import Backend, Generation, ModelListing
from core.types import Chunk, GenerationRequest
from gateway import openai_responses as out
from gateway.api_keys import ApiKey, ApiKeys
from gateway.errors import ApiError, bad_request, http_error
from gateway.metrics import METRICS_KEY, RequestTrack
from gateway.openai_generate import respond_joined, respond_streamed
from gateway.openai_requests import ParsedGeneration, parse_chat, parse_completion, parse_embeddings

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 << 20
# A client has this long to send a request's headers (and an idle keep-alive connection lives this
# long): aiohttp closes a connection whose handler still waits for headers when its keep-alive fires.
HEADER_TIMEOUT_S = 15.0
BODY_TIMEOUT_S = 20.0  # to send the whole body once the headers are in (4 MiB at >= 210 KB/s)
NODE_HEADER = "X-Meshllm-Node"
BACKEND_KEY = web.AppKey("backend", Backend)
KEYS_KEY = web.AppKey("api_keys", ApiKeys)
BODY_TIMEOUT_KEY = web.AppKey("body_timeout_s", float)
CALLER_KEY = web.RequestKey("api_key", ApiKey)  # the request's key, once authenticated
KEYED_PATHS = frozenset({"/metrics", "/mesh/stats"})  # what API clients asked for: behind the keys too
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as an OpenAI error object; nothing leaks a traceback to the client."""
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except MeshError as e:
        return http_error(e).response()
    except web.HTTPRequestEntityTooLarge:
        return ApiError(413, f"Request body too large (limit {MAX_BODY_BYTES} bytes).", code="body_too_large").response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return ApiError(e.status, e.reason, type="invalid_request_error").response()
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return ApiError(500, "Internal server error.", type="server_error").response()


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


@web.middleware
async def api_key_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """/v1/*, /metrics and /mesh/stats need `Authorization: Bearer KEY` when the node has keys; /health,
    the dashboard page and the rest of /mesh/* do not (peers fetch /mesh/advert)."""
    keys = request.app[KEYS_KEY]
    api = request.path.startswith("/v1/")
    if not keys.enabled or not (api or request.path in KEYED_PATHS):
        return await handler(request)
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise _unauthorized("Missing API key: send 'Authorization: Bearer YOUR_KEY'.")
    key = keys.match(presented.strip())
    if key is None:
        raise _unauthorized("Incorrect API key provided.")
    wait_s = keys.admit(key, time.monotonic()) if api else None  # a scrape is not an API request
    if wait_s is not None:
        raise ApiError(429, f"Rate limit of {key.rpm} requests per minute reached for this key.",
                       type="rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": str(max(1, math.ceil(wait_s)))})
    request[CALLER_KEY] = key
    return await handler(request)


def _check_model(request: web.Request, model: str) -> None:
    """A key with a model list may name only those models, by alias, digest or digest prefix."""
    key: ApiKey | None = request.get(CALLER_KEY)
    if key is None or key.models is None or model in key.models:
        return
    for m in request.app[BACKEND_KEY].list_models():
        named = model in (m.alias, m.digest) or (len(model) >= 12 and m.digest.startswith(model))
        if named and key.allows((m.alias, m.digest)):
            return
    raise ApiError(403, f"This API key may not use the model '{model}'.", param="model", code="model_not_allowed")


async def _json_body(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=request.content_length)
    body_timeout_s = request.app[BODY_TIMEOUT_KEY]
    try:
        async with asyncio.timeout(body_timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise ApiError(408, f"The request body was not received within {body_timeout_s:.0f} s.",
                       code="request_timeout", headers={"Connection": "close"}) from None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"Malformed JSON body: {e}") from None
    except RecursionError:
        raise bad_request("Malformed JSON body: nested too deeply.") from None


def _request_of(parsed: ParsedGeneration, request_id: str, index: int = 0) -> GenerationRequest:
    return parsed.request(request_id, index)


async def _relayed(request: web.Request, generation: GenerationRequest) -> GenerationRequest:
    """The client's body, validated by now, rides along for upstream holders (engine/upstream.py relays
    every field of it); aiohttp keeps the body it read, so this reads nothing again."""
    raw = await request.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # JSON in UTF-16/32: as JSON text, non-ASCII escaped
        text = json.dumps(json.loads(raw))
    return replace(generation, passthrough=text)


async def _start_stream(request: web.Request, generation: Generation) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            NODE_HEADER: generation.served_by,
            **generation.extra_headers,
        }
    )
    await response.prepare(request)
    return response


async def _generate(request: web.Request, parsed: ParsedGeneration, chat: bool) -> web.StreamResponse:
    _check_model(request, parsed.model)
    backend = request.app[BACKEND_KEY]
    cid = out.new_id("chatcmpl" if chat else "cmpl")
    created = int(time.time())
    metrics = request.app.get(METRICS_KEY)  # absent: metrics off (--no-metrics, or a bare app)
    track = metrics.track(cid) if metrics is not None else None
    try:
        generation = await backend.open_generation(parsed.model, await _relayed(request, _request_of(parsed, cid)))
    except MeshError as e:
        if track is not None and metrics is not None:
            track.model = metrics.model_label(parsed.model)  # only a model already served names a series
            track.finish(str(http_error(e).status))
        raise
    model = generation.model or parsed.model
    if track is not None:
        track.opened(generation.model, generation.served_by)
    try:
        def on_chunk(chunk: Chunk) -> None:
            if track is not None:
                track.chunk(chunk)

        async def open_choice(index: int) -> Generation:  # choices after the first (n > 1)
            return await backend.open_generation(parsed.model, await _relayed(request, _request_of(parsed, cid, index)))

        if not parsed.stream:
            body = await respond_joined(parsed, chat, cid, created, model, generation, open_choice, on_chunk)
            _finish(track, "200")
            return web.json_response(body, headers={NODE_HEADER: generation.served_by, **generation.extra_headers})
        response = await _start_stream(request, generation)
        ok = await respond_streamed(response, parsed, chat, cid, created, model, generation, open_choice, on_chunk)
        _finish(track, "200" if ok else "stream_error")
        return response
    except MeshError as e:  # before any byte of a non-streamed answer: the client gets an HTTP error
        _finish(track, str(http_error(e).status))
        raise
    except asyncio.CancelledError:  # the client went away
        _finish(track, "cancelled")
        raise
    except ConnectionResetError:
        # also the client going away: a write of a burst of queued chunks can meet the closing
        # transport before aiohttp has cancelled this handler (tests/gateway/test_metrics_hangup.py)
        if request.transport is None or request.transport.is_closing():
            _finish(track, "cancelled")
        raise
    finally:
        _finish(track, "500")  # a no-op unless nothing above said how it ended
        await generation.aclose()


def _finish(track: RequestTrack | None, status: str) -> None:
    if track is not None:
        track.finish(status)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_chat(await _json_body(request)), chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_completion(await _json_body(request)), chat=False)


async def embeddings(request: web.Request) -> web.StreamResponse:
    parsed = parse_embeddings(await _json_body(request))
    _check_model(request, parsed.model)
    result = await request.app[BACKEND_KEY].embed(parsed.model, list(parsed.inputs))
    vectors = [out.truncate_embedding(v, parsed.dimensions) for v in result.vectors]
    body = out.embeddings(parsed.model, vectors, parsed.encoding_format, result.prompt_tokens)
    return web.json_response(body, headers={NODE_HEADER: result.served_by})


def _listings(request: web.Request) -> list[ModelListing]:
    listings = request.app[BACKEND_KEY].list_models()
    key: ApiKey | None = request.get(CALLER_KEY)
    if key is not None:
        listings = [m for m in listings if key.allows((m.alias, m.digest))]
    return listings


def _model_object(m: ModelListing) -> dict:
    return {
        "id": m.alias,
        "object": "model",
        "created": 0,
        "owned_by": "meshllm",
        "meshllm": {
            "digest": m.digest,
            "n_layers": m.n_layers,
            "context_length": m.context_length,
            "nodes": list(m.nodes),
        },
    }


async def models(request: web.Request) -> web.StreamResponse:
    return web.json_response({"object": "list", "data": [_model_object(m) for m in _listings(request)]})


async def model_by_id(request: web.Request) -> web.StreamResponse:
    """GET /v1/models/{id}: by alias, digest or a 12+ character digest prefix."""
    wanted = request.match_info["model_id"]
    for m in _listings(request):
        if wanted in (m.alias, m.digest) or (len(wanted) >= 12 and m.digest.startswith(wanted)):
            return web.json_response(_model_object(m))
    raise ApiError(404, f"The model '{wanted[:256]}' does not exist.", param="model", code="model_not_found")


async def health(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def mesh_self(request: web.Request) -> web.StreamResponse:
    return web.json_response(request.app[BACKEND_KEY].describe_self())


async def _add_node_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault(NODE_HEADER, request.app[BACKEND_KEY].node_name)


def build_app(
    backend: Backend,
    *,
    api_keys: Iterable[str] = (),
    api_keys_file: Path | None = None,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    body_timeout_s: float = BODY_TIMEOUT_S,
) -> web.Application:
    """The API app. With `api_keys` or `api_keys_file` (format: `gateway/api_keys.py`), /v1/* needs a
    bearer key; a keys file that cannot be read raises ValueError. The timeouts: HEADER_TIMEOUT_S and
    BODY_TIMEOUT_S (tests of the cut-off pass shorter ones)."""
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=[error_middleware, api_key_middleware],
        handler_args={"keepalive_timeout": header_timeout_s},
    )
    app[BACKEND_KEY] = backend
    app[KEYS_KEY] = ApiKeys.load(api_keys, api_keys_file)
    app[BODY_TIMEOUT_KEY] = body_timeout_s
    app.on_response_prepare.append(_add_node_header)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model_id}", model_by_id)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/mesh/self", mesh_self)
    return app
