"""Why a request could not be served, in words of the mesh: neither HTTP nor gRPC.

The gateway maps these to HTTP (`gateway/errors.py`), the data plane to and from gRPC status codes
(`dataplane/status.py`); each map is written once. Engines raise subclasses (`QueueFull` is `Busy`,
`ContextLengthExceeded` is `ContextTooLong`).
"""

from __future__ import annotations


class MeshError(Exception):
    """A request could not be served."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(MeshError):
    """The request itself is wrong: retrying it anywhere gives the same answer."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class ContextTooLong(BadRequest):
    """The prompt plus the requested completion does not fit the context window."""

    def __init__(self, message: str, *, param: str | None = "max_tokens", code: str | None = "context_length_exceeded") -> None:
        super().__init__(message, param=param, code=code)


class ModelNotFound(MeshError):
    def __init__(self, model: str, available: list[str], message: str | None = None) -> None:
        listed = ", ".join(available) if available else "none"
        super().__init__(message or f"The model '{model}' does not exist on this mesh. Available models: {listed}")
        self.model = model
        self.available = available


class Busy(MeshError):
    """Every slot and queue place is taken: retry after `retry_after_s`."""

    def __init__(self, retry_after_s: int, message: str = "All holders of this model are busy; retry later.") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Refused(MeshError):
    """A peer answered with a definite refusal (not busy, not a bad request): another may accept."""


class Unavailable(MeshError):
    """A holder could not be reached or broke off (`code` says which path failed); another may succeed."""

    def __init__(self, message: str, *, code: str = "holder_failed") -> None:
        super().__init__(message)
        self.code = code


class CannotPlace(MeshError):
    """An offered model could not be placed or loaded over the mesh."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class Internal(MeshError):
    """Something broke that the client cannot fix."""
