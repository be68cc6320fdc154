"""Why a torch engine's session or step was refused; the pipeline stage maps each to a client error."""

from __future__ import annotations


class SessionError(Exception):
    """Unknown, duplicate or busy session, or a position that does not follow the session's cache."""


class SessionLimitError(SessionError):
    """Every KV slot is taken."""


class KVFullError(SessionError):
    """The KV pool had no block for the step's new positions (other sessions hold them all); the
    session keeps its slot and its cached positions, and may yield its blocks and recompute later."""
