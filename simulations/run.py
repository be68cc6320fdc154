"""Command line: `python -m simulations.run {plan, placement-benchmark, SCENARIO}`.

`plan` prints exactly `{"stages": [{"node", "start", "end"}, ...]}` or `{"error": "..."}` on stdout
(exit 0 either way: "does not fit" is an answer; exit 2 for an unreadable cluster file, still with
an `{"error": ...}` line), because outside checkers parse it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from placement.cluster import PlacementError
from placement.cluster_file import cluster_from_json
from simulations.benchmark import plan_timing, run_benchmark
from simulations.planners import PLANNERS
from simulations.scenarios import SCENARIOS, format_table, run_scenario


def _plan(args: argparse.Namespace) -> int:
    try:
        with open(args.cluster, encoding="utf-8") as f:
            cluster = cluster_from_json(json.load(f))
    except (OSError, ValueError, TypeError, KeyError) as e:
        print(json.dumps({"error": f"bad cluster file: {e}"}))
        return 2
    try:
        plan = PLANNERS[args.planner](cluster)
    except PlacementError as e:
        print(json.dumps({"error": str(e)}))
        return 0
    print(json.dumps(plan.to_json()))
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    report: dict[str, Any] = run_benchmark(args.clusters, args.seed)
    if not args.skip_timing:
        report["plan_timing"] = plan_timing(args.seed)
    if args.json:
        print(json.dumps(report))
        return 0
    s = report["summary"]
    print(f"placement-benchmark: {args.clusters} clusters, seed {args.seed}")
    print(f"{'planner':<26}{'failures':>9}{'median/opt':>12}{'worst/opt':>11}{'plan ms p50':>13}{'max':>9}")
    for name in PLANNERS:
        r = s[name]
        med = f"{r['ratio_to_optimal_median']:.4f}" if r["ratio_to_optimal_median"] else "-"
        worst = f"{r['ratio_to_optimal_worst']:.4f}" if r["ratio_to_optimal_worst"] else "-"
        print(f"{name:<26}{r['failures']:>9}{med:>12}{worst:>11}{r['plan_ms_median']:>13.2f}{r['plan_ms_max']:>9.2f}")
    print("acceptance:", json.dumps(s["acceptance"]))
    for row in report.get("plan_timing", []):
        print(f"plan_split {row['nodes']:>5} nodes {row['model']:<16} concurrency {row['concurrency']}: "
              f"{row['plan_ms_worst']:.1f} ms, {row['stages']} stages")
    return 0


def _scenario(args: argparse.Namespace) -> int:
    cfg = SCENARIOS[args.command]
    if args.no_anti_entropy:
        cfg = dataclasses.replace(cfg, anti_entropy=False)
    result = run_scenario(args.command, seed=args.seed, config=cfg)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.run")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="plan one cluster file")
    p.add_argument("--cluster", required=True)
    p.add_argument("--planner", default="meshllm", choices=sorted(PLANNERS))
    b = sub.add_parser("placement-benchmark", help="all planners on seeded random clusters")
    b.add_argument("--clusters", type=int, default=200)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", action="store_true")
    b.add_argument("--skip-timing", action="store_true", help="leave out the 64/1000-node plan timing")
    for name in SCENARIOS:
        s = sub.add_parser(name, help=f"simulate the {name} scenario")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--json", action="store_true")
        s.add_argument("--no-anti-entropy", action="store_true", help="nodes without the exchange (before)")
    args = parser.parse_args(argv)
    if args.command == "plan":
        return _plan(args)
    if args.command == "placement-benchmark":
        return _benchmark(args)
    return _scenario(args)


if __name__ == "__main__":
    sys.exit(main())
