"""The node-to-node data plane: how a request moves between nodes.

- plumbing and codecs: `rpc` (gRPC without codegen, msgpack, caps, the mesh token), `wire` and
  `stage_wire` (payloads), `status` (the one map between `core.errors` and gRPC status codes);
- the client: `channels`, `calls`, and `routing` (the router: view and catalog, ranking and dispatch
  under one retry policy, placing offered models, resuming after a failure);
- the server: `service` (Generate/Embed/LoadShard/GetAdvert), `stage` (the pipeline stages, which
  import torch: only nodes that may hold layer ranges load it), and `local` (serving on this node).
"""

from dataplane.channels import PeerChannels
from dataplane.routing.router import MeshRouter
from dataplane.rpc import build_server
from dataplane.service import NodeService

__all__ = ["MeshRouter", "NodeService", "PeerChannels", "build_server"]
