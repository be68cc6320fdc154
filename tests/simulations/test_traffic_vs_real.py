"""The simulator's traffic model against a real mesh: 8 `meshllm node join` processes, libp2p only,
on a private loopback (scripts/bench_discovery.py; needs root and `ip netns`, else skipped). The first
run is the one started in the background with the session (rest_bench.py), when there is one."""

from __future__ import annotations

import pytest
import rest_bench

from simulations.scenarios import SCENARIOS, run_scenario


@pytest.mark.skipif(not rest_bench.can_run(), reason="needs root and ip netns")
def test_homelab8_bytes_match_a_real_8_process_mesh(request: pytest.FixtureRequest) -> None:
    first = rest_bench.take(request.config)
    runs: list[dict] = []
    for attempt in range(2):  # a second mesh when the first did not form on the loaded 2-core box (seen 2 in ~15)
        run = first if attempt == 0 and first is not None else rest_bench.RestRun.start()
        real, log = run.result(timeout_s=300)
        runs.append({k: real[k] for k in ("all_alive_and_meshed", "peers_listed_min_max", "converged_s",
                                          "load_avg_1m")} | {"log": log[-600:]})
        if real["all_alive_and_meshed"]:
            break
    assert real["all_alive_and_meshed"], runs
    sim = run_scenario("homelab-8", seed=0, config=SCENARIOS["homelab-8"])
    predicted = sim["rest_sent_bytes_per_s_per_node"]
    assert 0.8 * real["bytes_per_node_s"] <= predicted <= 1.2 * real["bytes_per_node_s"], (predicted, real)
