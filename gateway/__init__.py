"""The OpenAI-compatible HTTP API of every node, and the routing of its requests over the mesh."""

from gateway.app import build_app
from gateway.router import MeshRouter

__all__ = ["MeshRouter", "build_app"]
