"""The simulator: deterministic per seed, and driving the production placement/membership code."""

from __future__ import annotations

import dataclasses

import pytest

import discovery.peer_table
import placement.choose_holder
import placement.plan
import placement.replan
import placement.route_pipeline
from simulations import mesh_sim
from simulations.scenarios import SCENARIOS, run_scenario

SMALL = dataclasses.replace(SCENARIOS["homelab-8"], duration_s=60.0)
TINY_CAMPUS = dataclasses.replace(SCENARIOS["campus-1000"], n_nodes=120, observers=10, duration_s=60.0)


def _sim_only(result: dict) -> dict:
    """Drop real-time figures: only simulated quantities must repeat exactly."""
    return {k: v for k, v in result.items() if "wall" not in k}


@pytest.mark.parametrize("cfg", [SMALL, TINY_CAMPUS], ids=["homelab-8", "campus-120"])
def test_same_seed_same_result(cfg: mesh_sim.ScenarioConfig) -> None:
    a = _sim_only(run_scenario(cfg.name, seed=7, config=cfg))
    b = _sim_only(run_scenario(cfg.name, seed=7, config=cfg))
    assert a == b
    assert a["requests_served"] > 0 and a["table_convergence_s"] is not None


def test_different_seed_differs() -> None:
    a = _sim_only(run_scenario(SMALL.name, seed=1, config=SMALL))
    b = _sim_only(run_scenario(SMALL.name, seed=2, config=SMALL))
    assert a != b


def test_simulator_uses_the_production_functions() -> None:
    # Identity: the simulator's names are the production objects, not copies.
    assert mesh_sim.PeerTable is discovery.peer_table.PeerTable
    assert mesh_sim.holder_mod is placement.choose_holder
    assert mesh_sim.plan is placement.plan
    assert mesh_sim.replan is placement.replan
    assert mesh_sim.pipeline_mod is placement.route_pipeline


def test_simulator_calls_plan_replan_and_choose_holder(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, int] = {"plan_split": 0, "replan": 0, "choose_holder": 0, "route_pipeline": 0, "apply": 0}

    def spy(module: object, name: str, key: str) -> None:
        real = getattr(module, name)

        def wrapper(*args: object, **kwargs: object) -> object:
            calls[key] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    spy(placement.plan, "plan_split", "plan_split")
    spy(placement.replan, "replan", "replan")
    spy(placement.choose_holder, "choose_holder", "choose_holder")
    spy(placement.route_pipeline, "route_pipeline", "route_pipeline")
    spy(discovery.peer_table.PeerTable, "apply", "apply")
    result = run_scenario(SMALL.name, seed=0, config=SMALL)
    assert result["replans"] >= 1
    assert all(v > 0 for v in calls.values()), calls
