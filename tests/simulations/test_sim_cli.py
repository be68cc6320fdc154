"""`python -m simulations.run plan`: the exact JSON shape outside checkers parse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = {"n_layers": 32, "layer_bytes": 218103808, "embed_bytes": 262144000, "head_bytes": 262144000,
         "kv_bytes_per_token_per_layer": 131072, "activation_bytes_per_token": 8192}
LINKS = {"default": {"latency_ms": 0.5, "bandwidth_bytes_per_s": 125000000},
         "pairs": [{"a": "a", "b": "b", "latency_ms": 3.0, "bandwidth_bytes_per_s": 12500000}]}


def _run(tmp_path: Path, cluster: dict, *extra: str) -> tuple[int, dict]:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(cluster))
    out = subprocess.run([sys.executable, "-m", "simulations.run", "plan", "--cluster", str(path), *extra],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    return out.returncode, json.loads(out.stdout)


def _cluster(nodes: list[dict]) -> dict:
    return {"model": MODEL, "context_tokens": 4096, "concurrency": 1, "nodes": nodes, "links": LINKS}


@pytest.mark.parametrize("planner", ["meshllm", "exo-ring-memory", "proportional-free-memory", "optimal"])
def test_plan_prints_stages(tmp_path: Path, planner: str) -> None:
    nodes = [{"id": "a", "memory_bytes": 14 * 2**30, "layer_time_ms": 0.9, "overhead_ms": 0.2},
             {"id": "b", "memory_bytes": 16 * 2**30, "layer_time_ms": 0.5, "overhead_ms": 0.2}]
    rc, out = _run(tmp_path, _cluster(nodes), "--planner", planner)
    assert rc == 0
    assert set(out) == {"stages"}
    stages = out["stages"]
    assert all(set(s) == {"node", "start", "end"} for s in stages)
    assert stages[0]["start"] == 0 and stages[-1]["end"] == 32
    assert all(x["end"] == y["start"] for x, y in zip(stages, stages[1:], strict=False))


def test_plan_prints_error_with_shortfall(tmp_path: Path) -> None:
    rc, out = _run(tmp_path, _cluster([{"id": "a", "memory_bytes": 2**30, "layer_time_ms": 0.9}]))
    assert rc == 0
    assert set(out) == {"error"} and "short by" in out["error"]


def test_bad_file_is_an_error_too(tmp_path: Path) -> None:
    rc, out = _run(tmp_path, {"model": {"n_layers": "x"}, "nodes": []})
    assert rc == 2 and set(out) == {"error"}
