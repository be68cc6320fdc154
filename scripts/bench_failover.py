"""Failover under faults (issue 14): stall from fault to next token, streams completed, tokens re-prefilled.

Starts real nodes on loopback: a pipeline mesh (a gateway holding nothing, two holders of each of
3 layer ranges of SmolLM2) and a whole-model mesh (a gateway, two torch whole-model holders). Each
fault streams a greedy completion, and after `--after` tokens kills (SIGKILL, then a restart in
place) or hangs (SIGSTOP, then SIGCONT) the node serving it (for the pipeline, stages 0, 1, 2 in
turn). Reports per kind p50/p95 of the stall (the longest gap between tokens from the fault on, over
the completed streams), the share of streams completed (ended without an error event), the share whose
ids equal a fault-free run's (a whole-model holder resumes from the text, re-tokenised, so its ids may
differ), and the tokens re-fed per recovery (prompt + ids generated before the fault).

    .venv/bin/python -m scripts.bench_failover --faults 20
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.mesh.failover_helpers import MODEL, PROMPT, Mesh, run_stream  # noqa: E402


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))] if ordered else float("nan")


def prompt_tokens(mesh: Mesh, body: dict) -> int:
    import urllib.request
    req = urllib.request.Request(mesh.gateway.url + "/v1/completions", data=json.dumps({**body, "max_tokens": 1}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())["usage"]["prompt_tokens"]


def run(mesh: Mesh, kind: str, faults: int, body: dict, after: int) -> dict:
    ref, _ = run_stream(mesh.gateway.url, body)
    n_prompt = prompt_tokens(mesh, body)
    rows = []
    for i in range(faults):
        sig = "kill" if i % 2 == 0 else "hang"
        position = (i // 2) % 3 if kind == "pipeline" else 0
        victim: list[str] = []

        def fault(record, sig=sig, position=position, victim=victim) -> None:
            name = Mesh.chain(record.served_by)[position]
            victim.append(name)
            mesh.nodes[name].proc.send_signal(signal.SIGKILL if sig == "kill" else signal.SIGSTOP)

        got, fault_at = run_stream(mesh.gateway.url, body, fault=fault, after_tokens=after)
        if sig == "hang" and victim:
            mesh.nodes[victim[0]].proc.send_signal(signal.SIGCONT)
        stall = got.max_gap_s(after=fault_at - 1e-3) if fault_at is not None else float("nan")
        completed = fault_at is not None and got.error is None and got.finish is not None
        rows.append({"sig": sig, "position": position, "stall_s": stall, "completed": completed,
                     "ids_equal": completed and got.ids == ref.ids,
                     "refed": n_prompt + after, "error": (got.error or {}).get("message")})
        print(json.dumps({"kind": kind, **rows[-1]}), flush=True)
        if sig == "kill" and victim:
            mesh.restart(victim[0])
        mesh.wait_sessions_freed(timeout_s=30)
    out = {}
    for sig in ("kill", "hang"):
        mine = [r for r in rows if r["sig"] == sig]
        stalls = [r["stall_s"] for r in mine if r["completed"]]
        out[sig] = {"n": len(mine), "stall_p50_s": statistics.median(stalls) if stalls else None,
                    "stall_p95_s": p95(stalls) if stalls else None,
                    "completed": sum(r["completed"] for r in mine) / len(mine) if mine else None,
                    "ids_equal": sum(r["ids_equal"] for r in mine) / len(mine) if mine else None,
                    "refed_tokens": statistics.mean(r["refed"] for r in mine) if mine else None}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=20, help="faults per mesh (half kills, half hangs)")
    parser.add_argument("--after", type=int, default=8, help="tokens streamed before the fault")
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--only", choices=("pipeline", "whole"), default=None)
    args = parser.parse_args()
    body = {"model": MODEL, "prompt": PROMPT, "temperature": 0, "max_tokens": args.max_tokens, "return_token_ids": True}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        def make_dir(name: str, kind: str = "") -> Path:
            path = Path(tmp) / f"{kind}{name}-{time.monotonic_ns()}"
            path.mkdir()
            return path
        for kind in ("pipeline", "whole"):
            if args.only not in (None, kind):
                continue
            mesh = Mesh.pipeline(make_dir) if kind == "pipeline" else Mesh.whole(make_dir)
            try:
                results[kind] = run(mesh, kind, args.faults, body, args.after)
            finally:
                mesh.stop()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
