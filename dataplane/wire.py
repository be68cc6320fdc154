"""Payloads of the data plane's calls (msgpack maps), validated both ways: Generate's request and chunk
frames, Embed, LoadShard. Activations have their own codec (`shard/activation_wire.py`)."""

from __future__ import annotations

import re
from array import array
from dataclasses import asdict
from typing import Any

from core.types import MAX_PROMPT_IDS, EmbedInput, is_model_id, is_upstream_id
from dataplane.rpc import PayloadError
from engine.chat_template import ROLES
from engine.types import Chunk, FinishReason, GenerationRequest, SamplingParams, TokenLogprob, Usage

DIGEST = re.compile(r"^[0-9a-f]{64}$")
MAX_TEXT_CHARS = 4 << 20
MAX_MESSAGES = 1024
MAX_RAW_CHARS = 6 << 20  # a client's body (4 MiB at most) as JSON text with non-ASCII escaped
_PARAM_TYPES: dict[str, tuple[type, ...]] = {
    "temperature": (float, int),
    "top_p": (float, int),
    "top_k": (int,),
    "min_p": (float, int),
    "seed": (int, type(None)),
    "stop": (list,),
    "max_tokens": (int, type(None)),
    "presence_penalty": (float, int),
    "frequency_penalty": (float, int),
    "logit_bias": (list,),
    "logprobs": (int, type(None)),
    "grammar": (str, type(None)),
}
MAX_TOP_LOGPROBS = 20


def encode_request(digest: str, request: GenerationRequest) -> dict[str, Any]:
    params = asdict(request.params)
    params["stop"] = list(request.params.stop)
    return {
        "model": digest,
        "rid": request.request_id,
        "prompt": request.prompt,
        "messages": [dict(m) for m in request.messages] if request.messages is not None else None,
        "continuation": request.continuation,
        "params": params,
        # the client's body, for an upstream holder only (engine/upstream.py relays it)
        **({"raw": request.passthrough} if request.passthrough and is_upstream_id(digest) else {}),
        **({"prompt_ids": list(request.prompt_ids)} if request.prompt_ids is not None else {}),
    }


def _text(value: Any, what: str, max_chars: int = MAX_TEXT_CHARS) -> str:
    if not isinstance(value, str) or len(value) > max_chars:
        raise PayloadError(f"{what} must be a string of at most {max_chars} characters")
    return value


def decode_request(obj: dict[str, Any]) -> tuple[str, GenerationRequest]:
    digest = obj.get("model")
    if not isinstance(digest, str) or not is_model_id(digest):
        raise PayloadError("model must be a sha256 hex digest or an upstream model id")
    params_in = obj.get("params")
    if not isinstance(params_in, dict) or set(params_in) - set(_PARAM_TYPES):
        raise PayloadError("params must be a map of known sampling parameters")
    for key, value in params_in.items():
        if isinstance(value, bool) or not isinstance(value, _PARAM_TYPES[key]):
            raise PayloadError(f"params.{key} has the wrong type")
    stop = params_in.get("stop", [])
    if not all(isinstance(s, str) and len(s) <= 256 for s in stop):
        raise PayloadError("params.stop must hold strings")
    bias = params_in.get("logit_bias", [])
    if len(bias) > 1024 or not all(
        isinstance(b, list) and len(b) == 2 and type(b[0]) is int and type(b[1]) in (int, float) for b in bias
    ):
        raise PayloadError("params.logit_bias must hold [token id, bias] pairs")
    messages_in = obj.get("messages")
    messages = None
    if messages_in is not None:
        if not isinstance(messages_in, list) or not 0 < len(messages_in) <= MAX_MESSAGES:
            raise PayloadError("messages must be a non-empty list")
        messages = []
        for m in messages_in:
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise PayloadError("each message needs a known role")
            messages.append({"role": m["role"], "content": _text(m.get("content"), "content")})
    prompt = obj.get("prompt")
    prompt_ids = obj.get("prompt_ids")
    if prompt_ids is not None:
        prompt_ids = _token_ids(prompt_ids, "prompt_ids")
    try:
        params = SamplingParams(**{**params_in, "stop": tuple(stop),
                                   "logit_bias": tuple((t, float(b)) for t, b in bias)})
        request = GenerationRequest(
            request_id=_text(obj.get("rid", ""), "rid", 128),
            params=params,
            prompt=_text(prompt, "prompt") if prompt is not None else None,
            messages=tuple(messages) if messages is not None else None,
            continuation=_text(obj.get("continuation", ""), "continuation"),
            passthrough=_text(obj.get("raw", ""), "raw", MAX_RAW_CHARS),
            prompt_ids=prompt_ids,
        )
    except ValueError as e:
        raise PayloadError(str(e)) from None
    return digest, request


def _token_ids(value: Any, what: str) -> tuple[int, ...]:
    """Token ids from a peer: a list of 1 to MAX_PROMPT_IDS non-negative int32s (the engine checks
    them against its vocabulary)."""
    if not (isinstance(value, list) and 0 < len(value) <= MAX_PROMPT_IDS
            and all(type(i) is int and 0 <= i < 1 << 31 for i in value)):
        raise PayloadError(f"{what} must be a list of 1 to {MAX_PROMPT_IDS} token ids")
    return tuple(value)


def encode_chunk(chunk: Chunk) -> dict[str, Any]:
    frame: dict[str, Any] = {"t": chunk.text, "ids": chunk.token_ids}
    if chunk.finish_reason is not None:
        frame["f"] = str(chunk.finish_reason)
    if chunk.usage is not None:
        frame["u"] = [chunk.usage.prompt_tokens, chunk.usage.completion_tokens, chunk.usage.cached_tokens]
    if chunk.logprobs:
        frame["lp"] = [[lp.piece, lp.logprob, [list(alt) for alt in lp.top]] for lp in chunk.logprobs]
    return frame


def _logprob(obj: Any) -> TokenLogprob:
    if not (isinstance(obj, list) and len(obj) == 3 and isinstance(obj[0], bytes) and len(obj[0]) <= 256
            and isinstance(obj[1], float) and isinstance(obj[2], list) and len(obj[2]) <= MAX_TOP_LOGPROBS):
        raise PayloadError("bad logprobs")
    top = []
    for alt in obj[2]:
        if not (isinstance(alt, list) and len(alt) == 2 and isinstance(alt[0], bytes) and len(alt[0]) <= 256
                and isinstance(alt[1], float)):
            raise PayloadError("bad logprobs")
        top.append((alt[0], alt[1]))
    return TokenLogprob(obj[0], obj[1], tuple(top))


def decode_chunk(obj: dict[str, Any]) -> Chunk:
    text, ids = obj.get("t", ""), obj.get("ids", [])
    if not isinstance(text, str) or not isinstance(ids, list) or len(ids) > 1 << 16:
        raise PayloadError("bad chunk frame")
    if not all(isinstance(i, int) and 0 <= i < 1 << 31 for i in ids):
        raise PayloadError("bad token ids")
    chunk = Chunk(text=text, token_ids=ids)
    if "f" in obj:
        try:
            chunk.finish_reason = FinishReason(obj["f"])
        except ValueError:
            raise PayloadError("bad finish reason") from None
    if "u" in obj:
        u = obj["u"]
        if not (isinstance(u, list) and len(u) in (2, 3) and all(isinstance(x, int) and x >= 0 for x in u)):
            raise PayloadError("bad usage")
        chunk.usage = Usage(*u)
    if "lp" in obj:
        lps = obj["lp"]
        if not isinstance(lps, list) or len(lps) > len(ids):
            raise PayloadError("bad logprobs")
        chunk.logprobs = [_logprob(lp) for lp in lps]
    return chunk


MAX_EMBED_INPUTS = 256
MAX_EMBED_DIM = 1 << 16


def encode_embeddings(vectors: list[list[float]], tokens: int) -> dict[str, Any]:
    dim = len(vectors[0]) if vectors else 0
    flat = array("f", (x for v in vectors for x in v))
    return {"dim": dim, "n": len(vectors), "data": flat.tobytes(), "tokens": tokens}


def decode_embeddings(obj: dict[str, Any]) -> tuple[list[list[float]], int]:
    dim, n, data, tokens = obj.get("dim"), obj.get("n"), obj.get("data"), obj.get("tokens")
    if not (isinstance(dim, int) and isinstance(n, int) and isinstance(data, bytes) and isinstance(tokens, int)):
        raise PayloadError("bad embeddings payload")
    if not (0 < dim <= MAX_EMBED_DIM and 0 < n <= MAX_EMBED_INPUTS and len(data) == 4 * dim * n):
        raise PayloadError("embeddings payload has the wrong size")
    flat = array("f")
    flat.frombytes(data)
    return [flat[i * dim : (i + 1) * dim].tolist() for i in range(n)], tokens


def decode_embed_request(obj: dict[str, Any]) -> tuple[str, list[EmbedInput]]:
    digest, inputs = obj.get("model"), obj.get("input")
    if not isinstance(digest, str) or not is_model_id(digest):
        raise PayloadError("model must be a sha256 hex digest")
    if not isinstance(inputs, list) or not 0 < len(inputs) <= MAX_EMBED_INPUTS:
        raise PayloadError(f"input must be a list of 1 to {MAX_EMBED_INPUTS} strings or token id lists")
    return digest, [_token_ids(t, "input") if isinstance(t, list) else _text(t, "input") for t in inputs]


def decode_load_shard(obj: dict[str, Any]) -> tuple[str, int, int]:
    digest, start, end = obj.get("model"), obj.get("start"), obj.get("end")
    if not (isinstance(digest, str) and DIGEST.match(digest) and isinstance(start, int)
            and isinstance(end, int) and 0 <= start < end <= 1 << 16):
        raise PayloadError("LoadShard needs model, start and end")
    return digest, start, end
