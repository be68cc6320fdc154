"""plan_split against the exhaustive optimum and the memory-proportional baselines."""

from __future__ import annotations

import random

import pytest

from placement.cluster import PlacementError
from placement.plan import plan_split
from simulations.baselines import exo_ring_memory, optimal_plan, proportional_free_memory
from simulations.random_clusters import random_cluster


@pytest.mark.parametrize("seed", range(3))
def test_matches_optimal_and_beats_baselines(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(8):
        _, c = random_cluster(rng)
        try:
            best = optimal_plan(c)
        except PlacementError:
            with pytest.raises(PlacementError):
                plan_split(c)
            continue
        ours = plan_split(c)
        assert ours.objective_ms == pytest.approx(best.objective_ms, rel=1e-9)
        for baseline in (exo_ring_memory, proportional_free_memory):
            try:
                assert ours.objective_ms <= baseline(c).objective_ms * (1 + 1e-9)
            except PlacementError:
                pass  # the baseline's split overflows a node: it fails this cluster
