"""The OpenAI-compatible HTTP API of every node. It speaks HTTP and OpenAI only: where a request runs
is its backend's business (`core.serving.Backend`; on a node, `dataplane.MeshRouter`)."""

from gateway.app import build_app

__all__ = ["build_app"]
