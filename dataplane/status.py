"""The one map between `core.errors` and gRPC status codes, both ways.

A server aborts a call with `abort(context, error)`; a client turns the `AioRpcError` back into the
same kind of error with `from_rpc_error`. The kind travels as the status code; what a code alone
cannot say (retry-after, an OpenAI `param`/`code`) travels in trailing metadata.
"""

from __future__ import annotations

from typing import NoReturn

import grpc

from core.errors import BadRequest, Busy, ContextTooLong, MeshError, ModelNotFound, Refused, Unavailable

RETRY_AFTER_KEY = "retry-after"
PARAM_KEY = "x-meshllm-param"
CODE_KEY = "x-meshllm-code"

# A holder that answers with one of these could not serve: another holder may succeed.
UNAVAILABLE_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.NOT_FOUND,  # the holder dropped the model since its advert
    grpc.StatusCode.UNAUTHENTICATED,
})


def status_of(error: MeshError) -> tuple[grpc.StatusCode, tuple[tuple[str, str], ...]]:
    """The status code and trailing metadata that carry `error` to the caller."""
    if isinstance(error, Busy):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, ((RETRY_AFTER_KEY, str(error.retry_after_s)),)
    if isinstance(error, BadRequest):
        extra = ((PARAM_KEY, error.param),) if error.param else ()
        return grpc.StatusCode.INVALID_ARGUMENT, extra + (((CODE_KEY, error.code),) if error.code else ())
    if isinstance(error, ModelNotFound):
        return grpc.StatusCode.NOT_FOUND, ()
    if isinstance(error, Refused):
        return grpc.StatusCode.FAILED_PRECONDITION, ()
    if isinstance(error, Unavailable):
        return grpc.StatusCode.UNAVAILABLE, ()
    return grpc.StatusCode.INTERNAL, ()


async def abort(context: grpc.aio.ServicerContext, error: MeshError) -> NoReturn:
    code, metadata = status_of(error)
    await context.abort(code, error.message, trailing_metadata=metadata)
    raise AssertionError("unreachable: context.abort raises")


def from_status(code: grpc.StatusCode, details: str, metadata: dict[str, str]) -> MeshError:
    """The error a peer's status stands for."""
    if code in UNAVAILABLE_CODES:
        return Unavailable(f"{code.name}: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry = metadata.get(RETRY_AFTER_KEY, "")
        return Busy(int(retry) if retry.isdigit() else 1, details or code.name)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        param, kind = metadata.get(PARAM_KEY), metadata.get(CODE_KEY)
        if kind == "context_length_exceeded":
            return ContextTooLong(details, param=param)
        return BadRequest(details or code.name, param=param, code=kind)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return Refused(details or code.name)
    return Refused(f"{code.name}: {details}")  # e.g. UNIMPLEMENTED: a peer without that service


def from_rpc_error(e: grpc.aio.AioRpcError) -> MeshError:
    metadata = {str(k): str(v) for k, v in (e.trailing_metadata() or ())}
    return from_status(e.code(), e.details() or "", metadata)
