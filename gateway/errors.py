"""OpenAI-style error objects ({"error": {"message", "type", "param", "code"}}), and the one map from
the mesh's errors (`core.errors`) to HTTP."""

from __future__ import annotations

import json

from aiohttp import web

from core.errors import BadRequest, Busy, CannotPlace, MeshError, ModelNotFound, Unavailable


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            text=json.dumps(self.body()),
            content_type="application/json",
            headers=self.headers,
        )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def http_error(e: MeshError) -> ApiError:
    """The one map from the mesh's errors to HTTP status codes and OpenAI error objects."""
    if isinstance(e, BadRequest):
        return ApiError(400, e.message, param=e.param, code=e.code)
    if isinstance(e, ModelNotFound):
        return ApiError(404, e.message, param="model", code="model_not_found")
    if isinstance(e, Busy):
        return ApiError(429, e.message, type="rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(e.retry_after_s)})
    if isinstance(e, Unavailable):
        return ApiError(502, e.message, type="server_error", code=e.code)
    if isinstance(e, CannotPlace):
        return ApiError(503, e.message, type="server_error", code=e.code)
    return ApiError(500, e.message, type="server_error")
