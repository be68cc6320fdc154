"""Named scenarios for `python -m simulations.run SCENARIO`, and the table they print."""

from __future__ import annotations

import time
from typing import Any

from simulations.mesh_sim import MeshSim, ScenarioConfig

_HOME = ("rtx3090", "rtx4090", "rtx3060-12gb", "m2-16gb", "m2-24gb", "m2-max-64gb", "cpu-ddr5-64gb",
         "cpu-ddr5-128gb")

SCENARIOS: dict[str, ScenarioConfig] = {c.name: c for c in (
    ScenarioConfig("homelab-3", 3, ("rtx3090", "rtx3060-12gb", "cpu-ddr5-64gb"), duration_s=120,
                   request_rate_per_s=0.3, crashes=0),
    # libp2p only: the mesh `scripts/bench_discovery.py --modes libp2p --sizes 8` runs for real
    ScenarioConfig("homelab-8", 8, _HOME, mode="libp2p", duration_s=120, request_rate_per_s=1.0, crashes=1),
    # two sites: LAN multicast inside each, libp2p between them
    ScenarioConfig("office-32", 32, _HOME + ("h100-80gb",), n_sites=2, duration_s=150, request_rate_per_s=4.0),
    # past one LAN: a bounded sample of peers and model-keyed records
    # libp2p only, the last node to boot loses its gossiped announcement (docs/discovery.md, anti-entropy);
    # --no-anti-entropy runs the same without the exchange
    ScenarioConfig("lost-announce-48", 48, _HOME, mode="libp2p", duration_s=100, request_rate_per_s=0.1,
                   crashes=0, lost_announce=1),
    ScenarioConfig("lost-announce-100", 100, _HOME, mode="libp2p", duration_s=100, request_rate_per_s=0.1,
                   crashes=0, lost_announce=1),
    ScenarioConfig("campus-1000", 1000, _HOME + ("h100-80gb",), n_sites=4, mode="records", duration_s=120,
                   boot_window_s=10.0, request_rate_per_s=20.0),
)}


def run_scenario(name: str, seed: int = 0, config: ScenarioConfig | None = None) -> dict[str, Any]:
    """Run one scenario; `*_wall_*` figures are real time on this machine, the rest is simulated."""
    cfg = config or SCENARIOS[name]
    t0 = time.perf_counter()
    result = MeshSim(cfg, seed).run()
    result["seed"] = seed
    result["run_wall_s"] = round(time.perf_counter() - t0, 2)
    return result


def format_table(result: dict[str, Any]) -> str:
    width = max(len(k) for k in result)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    lines += [f"{k:<{width}}  {'-' if v is None else v}" for k, v in result.items()]
    return "\n".join(lines)
