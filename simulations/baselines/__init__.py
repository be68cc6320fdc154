"""Planners to compare against, by the names the CLI accepts."""

from simulations.baselines.optimal import optimal_plan
from simulations.baselines.proportional import exo_ring_memory, proportional_free_memory

__all__ = ["exo_ring_memory", "optimal_plan", "proportional_free_memory"]
