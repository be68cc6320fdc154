"""The client side's decisions: one view per request, the catalog, ranking and dispatch under one
retry policy, placing offered models, resuming after a failure. `view`, `retry` and `resume_request`
are pure."""

from dataplane.routing.router import MeshRouter

__all__ = ["MeshRouter"]
