"""What every layer shares: one exception hierarchy that names no transport, and the serving types
that cross from the mesh to the gateway. Imports nothing of ours."""

from core.errors import (
    BadRequest,
    Busy,
    CannotPlace,
    ContextTooLong,
    Internal,
    MeshError,
    ModelNotFound,
    Refused,
    Unavailable,
)
from core.serving import Backend, Embeddings, Generation, ModelListing, first_chunk

__all__ = [
    "Backend",
    "BadRequest",
    "Busy",
    "CannotPlace",
    "ContextTooLong",
    "Embeddings",
    "Generation",
    "Internal",
    "MeshError",
    "ModelListing",
    "ModelNotFound",
    "Refused",
    "Unavailable",
    "first_chunk",
]
