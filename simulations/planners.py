"""Planners by the names the CLI and the benchmark use."""

from __future__ import annotations

from collections.abc import Callable

from placement.cluster import Cluster, Plan
from placement.plan import plan_split
from simulations.baselines import exo_ring_memory, optimal_plan, proportional_free_memory

Planner = Callable[[Cluster], Plan]

PLANNERS: dict[str, Planner] = {
    "meshllm": plan_split,
    "exo-ring-memory": exo_ring_memory,
    "proportional-free-memory": proportional_free_memory,
    "optimal": optimal_plan,
}
BASELINES = ("exo-ring-memory", "proportional-free-memory")
