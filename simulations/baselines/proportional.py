"""Memory-proportional splits, as exo and llama.cpp RPC do them.

Both give each node a share of the layers proportional to a memory figure and ignore speed and
links. Shares are cut with exo's rule (stage i ends at floor(cumulative_fraction * n_layers), the
last at n_layers); a node whose share rounds to zero layers is left out. If any stage then holds
more than its memory fits (weights + KV cache, embedding on the first, head on the last), the
baseline *fails* on that cluster and raises `PlacementError`: that is what those tools would do
(out of memory at load), and the benchmark counts it as a failure, not as a score.
"""

from __future__ import annotations

from collections.abc import Sequence

from placement.cluster import Cluster, NodeSpec, PlacementError, Plan, Stage
from placement.plan import score


def proportional_split(cluster: Cluster, order: Sequence[NodeSpec], weights: Sequence[int]) -> Plan:
    n = cluster.model.n_layers
    total = sum(weights)
    if total <= 0:
        raise PlacementError("no memory to split over")
    stages = []
    cum = 0
    start = 0
    for i, (node, w) in enumerate(zip(order, weights, strict=True)):
        cum += w
        end = n if i == len(order) - 1 else min(n, (cum * n) // total)
        if end > start:
            stages.append(Stage(node.id, start, end))
            start = end
    return score(cluster, stages)


def exo_ring_memory(cluster: Cluster) -> Plan:
    """exo: every node, sorted by total memory descending, split in proportion to total memory."""
    order = sorted(cluster.nodes, key=lambda nd: (-nd.total_memory_bytes, nd.id))
    return proportional_split(cluster, order, [nd.total_memory_bytes for nd in order])


def proportional_free_memory(cluster: Cluster) -> Plan:
    """llama.cpp RPC's default: devices in the order given, split in proportion to free memory."""
    order = list(cluster.nodes)
    return proportional_split(cluster, order, [nd.memory_bytes for nd in order])
