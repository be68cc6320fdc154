"""Builders of OpenAI response objects and stream chunks."""

from __future__ import annotations

import base64
import json
import secrets
import struct
import time

from engine.types import Usage


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage_dict(usage: Usage | None) -> dict[str, int]:
    if usage is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
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
