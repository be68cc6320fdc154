"""The simulator's traffic model against a real mesh: 8 `meshllm node join` processes, libp2p only,
on a private loopback (scripts/bench_discovery.py; needs root and `ip netns`, else skipped)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.scenarios import SCENARIOS, run_scenario

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and ip netns")
def test_homelab8_bytes_match_a_real_8_process_mesh(tmp_path: Path) -> None:
    out = tmp_path / "rest.json"
    runs: list[dict] = []
    for _ in range(2):  # a second mesh when the first did not form on the loaded 2-core box (seen 2 in ~15)
        done = subprocess.run([sys.executable, "scripts/bench_discovery.py", "--rest-only", "--modes", "libp2p",
                               "--sizes", "8", "--rest-s", "30", "--settle-s", "5", "--json", str(out)],
                              cwd=ROOT, check=True, timeout=300, capture_output=True, text=True)
        [real] = json.loads(out.read_text())["rest"]
        runs.append({k: real[k] for k in ("all_alive_and_meshed", "peers_listed_min_max", "converged_s",
                                          "load_avg_1m")} | {"log": done.stdout[-600:]})
        if real["all_alive_and_meshed"]:
            break
    assert real["all_alive_and_meshed"], runs
    sim = run_scenario("homelab-8", seed=0, config=SCENARIOS["homelab-8"])
    predicted = sim["rest_sent_bytes_per_s_per_node"]
    assert 0.8 * real["bytes_per_node_s"] <= predicted <= 1.2 * real["bytes_per_node_s"], (predicted, real)
