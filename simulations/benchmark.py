"""placement-benchmark: every planner on the same seeded random clusters.

Objective per cluster (lower is better): time per token in ms when concurrency is 1, else the
bottleneck stage time in ms. A planner that cannot produce a valid plan (a memory-proportional
split that overflows a node, for instance) scores `null` and counts as a failure. Clusters where
even `optimal` finds no plan are redrawn, so every cluster has an answer.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

from placement.cluster import PlacementError
from placement.plan import plan_split
from simulations.planners import BASELINES, PLANNERS
from simulations.random_clusters import large_cluster, random_cluster

_TIE = 1e-9


def run_benchmark(n_clusters: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    redrawn = 0
    while len(rows) < n_clusters:
        model_name, cluster = random_cluster(rng)
        objectives: dict[str, float | None] = {}
        plan_ms: dict[str, float] = {}
        for name, planner in PLANNERS.items():
            t0 = time.perf_counter()
            try:
                objectives[name] = planner(cluster).objective_ms
            except PlacementError:
                objectives[name] = None
            plan_ms[name] = (time.perf_counter() - t0) * 1000.0
        if objectives["optimal"] is None:
            redrawn += 1
            continue
        rows.append({"index": len(rows), "model": model_name, "nodes": len(cluster.nodes),
                     "concurrency": cluster.concurrency, "context_tokens": cluster.context_tokens,
                     "objective_ms": objectives, "plan_ms": {k: round(v, 3) for k, v in plan_ms.items()}})
    return {"seed": seed, "clusters": n_clusters, "redrawn_unplaceable": redrawn,
            "summary": summarize(rows), "results": rows}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in PLANNERS:
        vals = [(r["objective_ms"][name], r["objective_ms"]["optimal"]) for r in rows]
        ratios = [v / o for v, o in vals if v is not None]
        times = [r["plan_ms"][name] for r in rows]
        out[name] = {
            "failures": sum(v is None for v, _ in vals),
            "ratio_to_optimal_median": statistics.median(ratios) if ratios else None,
            "ratio_to_optimal_worst": max(ratios) if ratios else None,
            "plan_ms_median": statistics.median(times),
            "plan_ms_max": max(times),
        }
    ours = [r["objective_ms"]["meshllm"] for r in rows]
    beaten = {b: sum(1 for r, m in zip(rows, ours, strict=True)
                     if r["objective_ms"][b] is not None and (m is None or m > r["objective_ms"][b] * (1 + _TIE)))
              for b in BASELINES}
    m = out["meshllm"]
    out["acceptance"] = {
        "clusters_where_a_baseline_beats_meshllm": beaten,
        "meshllm_at_least_every_baseline": all(v == 0 for v in beaten.values()) and m["failures"] == 0,
        "median_within_3pct_of_optimal": m["ratio_to_optimal_median"] is not None
        and m["ratio_to_optimal_median"] <= 1.03,
        "worst_within_10pct_of_optimal": m["ratio_to_optimal_worst"] is not None
        and m["ratio_to_optimal_worst"] <= 1.10,
    }
    return out


def plan_timing(seed: int, sizes: tuple[int, ...] = (64, 1000), repeats: int = 3) -> list[dict[str, Any]]:
    """Wall time of `plan_split` on large seeded campus clusters, both objectives, worst of repeats."""
    rows = []
    for n in sizes:
        for model in ("llama3-8b-q4", "llama3-70b-q4", "llama3-70b-bf16"):
            for concurrency in (1, 8):
                cluster = large_cluster(random.Random(seed + n), n, model, concurrency)
                t0 = time.perf_counter()
                plan = plan_split(cluster)
                worst = time.perf_counter() - t0
                for _ in range(repeats - 1):
                    t0 = time.perf_counter()
                    plan_split(cluster)
                    worst = max(worst, time.perf_counter() - t0)
                rows.append({"nodes": n, "model": model, "concurrency": concurrency, "stages": len(plan.stages),
                             "objective_ms": round(plan.objective_ms, 3), "plan_ms_worst": round(worst * 1000, 2)})
    return rows
