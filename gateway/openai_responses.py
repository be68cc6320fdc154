"""Builders of OpenAI response objects and stream chunks."""

from __future__ import annotations

import base64
import json
import secrets
import struct
import time

from engine.types import TokenLogprob, Usage


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage_dict(usage: Usage | None) -> dict:
    if usage is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def chat_completion(cid: str, model: str, text: str, finish: str, usage: Usage | None) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": None,
            }
        ],
        "usage": usage_dict(usage),
    }


def chat_chunk(
    cid: str, model: str, created: int, delta: dict, finish: str | None, usage: Usage | None = None
) -> dict:
    chunk: dict = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }
    if usage is not None:
        chunk["choices"] = []
        chunk["usage"] = usage_dict(usage)
    return chunk


def text_completion(cid: str, model: str, created: int, text: str, finish: str | None, usage: Usage | None) -> dict:
    body: dict = {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
    }
    if usage is not None:
        body["usage"] = usage_dict(usage)
    return body


def embeddings(model: str, vectors: list[list[float]], fmt: str, prompt_tokens: int) -> dict:
    data = []
    for i, vector in enumerate(vectors):
        value: list[float] | str = vector
        if fmt == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _token(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def chat_logprobs(logprobs: list[TokenLogprob]) -> dict:
    """`choices[].logprobs` of a chat answer (or of one stream chunk's tokens)."""
    return {
        "content": [
            {
                "token": _token(lp.piece), "logprob": lp.logprob, "bytes": list(lp.piece),
                "top_logprobs": [{"token": _token(p), "logprob": v, "bytes": list(p)} for p, v in lp.top],
            }
            for lp in logprobs
        ],
        "refusal": None,
    }


def completion_logprobs(logprobs: list[TokenLogprob], offset: int = 0) -> dict:
    """`choices[].logprobs` of a text completion (the legacy shape); offsets count characters."""
    tokens, offsets = [], []
    for lp in logprobs:
        offsets.append(offset)
        tokens.append(_token(lp.piece))
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{_token(p): v for p, v in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


def truncate_embedding(vector: list[float], dimensions: int | None) -> list[float]:
    """OpenAI's `dimensions`: the first `dimensions` values, renormalised to unit length."""
    if dimensions is None or dimensions >= len(vector):
        return vector
    head = vector[:dimensions]
    norm = sum(x * x for x in head) ** 0.5
    return [x / norm for x in head] if norm > 0 else head
