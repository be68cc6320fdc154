"""Discovery benchmark: how fast a new node becomes visible everywhere, and advert traffic at rest.

    sudo .venv/bin/python scripts/bench_discovery.py [--sizes 3 8] [--trials 10] [--rest-s 20]
    sudo .venv/bin/python scripts/bench_discovery.py --rest-only --modes libp2p --sizes 8 32 --json out.json

Real `meshllm node join --no-model` processes on loopback, each with a unique mesh secret.

* **Join latency.** N-1 nodes form a mesh; then, trial after trial, one more node is spawned (a fresh
  identity each time) and every other node's `GET /mesh/peers` is polled every 50 ms until all list
  it. Reported from the process spawn and from its "ready" line, p50/p95 over the trials.
* **Traffic at rest.** N nodes, settled, nothing polling them. As root the whole run happens in a
  fresh network namespace (only our nodes on its loopback) and a raw AF_PACKET socket on `lo` counts
  every IPv4 packet once (outgoing copy only): IP headers, TCP handshakes and ACKs, HTTP headers, mDNS
  multicast, libp2p gossip, all of it. Bytes per node per second = total bytes / N / seconds, i.e. the
  average bytes each node sends. Broken down by kind: mDNS (UDP 5353), advert multicast refresh (UDP
  5454), advert fetches (TCP to a node's HTTP port), libp2p (TCP to a libp2p port), other.
* **Modes.** `mdns`, `mdns+libp2p`, and `libp2p` (libp2p only: `--no-mdns`, every node bootstraps from
  the first, as beyond one LAN). `--rest-only` runs just the N-process mesh at rest, and also reports
  its convergence (last node ready -> every node lists every other) and the box's load average.
Target (issue 3): visible everywhere within 2 s p95; under 1 KB/s of advert traffic per node at rest.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from scripts.loopback_capture import LoopbackCapture  # noqa: E402

POLL_S = 0.05
TARGET_VISIBLE_P95_S = 2.0
TARGET_REST_BYTES_PER_S = 1000.0
READY = re.compile(r"\(([0-9a-f]{32})\) ready at http://[^:]+:(\d+)")


# --- node processes ----------------------------------------------------------------------------------


@dataclass
class Proc:
    proc: subprocess.Popen
    spawned_at: float
    name: str = ""
    ready_at: float | None = None
    node_id: str = ""
    http_port: int = 0
    output: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


TRACE = False  # --trace: nodes run through scripts/libp2p_trace_node.py (py-libp2p's bytes by protocol)


def trace_path(workdir: Path, name: str) -> Path:
    return workdir / f"{name}.trace.json"


def spawn(workdir: Path, name: str, secret: str, extra: list[str]) -> Proc:
    entry = ["scripts/libp2p_trace_node.py", str(trace_path(workdir, name))] if TRACE else ["-m", "node.cli"]
    cmd = [sys.executable, *entry, "node", "join", "--no-model", "--http-port", "0",
           "--data-dir", str(workdir / name), "--name", name, "--mesh-secret", secret,
           "--log-level", "WARNING", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    popen = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    p = Proc(popen, time.monotonic(), name=name)

    def read() -> None:  # also drains the pipe for the node's whole life
        for line in popen.stdout:  # type: ignore[union-attr]
            if p.ready_at is None and (m := READY.search(line)):
                p.ready_at = time.monotonic()
                p.node_id, p.http_port = m.group(1), int(m.group(2))
                p.ready.set()
            elif len(p.output) < 200:
                p.output.append(line)

    threading.Thread(target=read, daemon=True).start()
    return p


def wait_ready(procs: list[Proc], timeout_s: float = 90) -> None:
    for p in procs:
        if not p.ready.wait(timeout_s):
            raise RuntimeError("a node did not start:\n" + "".join(p.output))


def peer_ids(url: str) -> set[str]:
    try:
        with urllib.request.urlopen(url + "/mesh/peers", timeout=5) as resp:
            return {row["node_id"] for row in json.loads(resp.read())}
    except (urllib.error.URLError, OSError, ValueError):
        return set()


def wait_full_mesh(procs: list[Proc], timeout_s: float = 60, records: bool = False) -> float:
    """Until every node lists every other (records mode: at least one peer, since a node there tracks
    only a sample of peers and the holders it looked up)."""
    t0 = time.monotonic()
    ids = {p.node_id for p in procs}

    def done(p: Proc) -> bool:
        seen = peer_ids(p.url)
        return bool(seen) if records else seen == ids - {p.node_id}

    while not all(done(p) for p in procs):
        if time.monotonic() - t0 > timeout_s:
            seen = [len(peer_ids(p.url)) for p in procs]
            raise RuntimeError(f"the mesh did not form: peers listed by each node {seen}")
        time.sleep(POLL_S)
    return time.monotonic() - t0


# --- measurements ------------------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def join_latency(workdir: Path, n: int, trials: int, extra: list[str]) -> dict:
    secret = f"bench-{secrets.token_hex(8)}"
    base = [spawn(workdir, f"n{n}-base{i}", secret, extra) for i in range(n - 1)]
    t_spawn_all = time.monotonic()
    from_spawn: list[float] = []
    from_ready: list[float] = []
    try:
        wait_ready(base)
        cold_mesh_s = wait_full_mesh(base) + max(p.ready_at for p in base) - t_spawn_all  # type: ignore[operator]
        for k in range(trials):
            new = spawn(workdir, f"n{n}-join{k}", secret, extra)
            wait_ready([new])
            while not all(new.node_id in peer_ids(p.url) for p in base):
                if time.monotonic() - new.spawned_at > 30:
                    raise RuntimeError(f"node {k} never became visible everywhere")
                time.sleep(POLL_S)
            seen = time.monotonic()
            from_spawn.append(seen - new.spawned_at)
            from_ready.append(seen - new.ready_at)  # type: ignore[operator]
            new.stop()
            while any(new.node_id in peer_ids(p.url) for p in base):  # a clean slate for the next trial
                time.sleep(POLL_S)
    finally:
        for p in base:
            p.stop()
    return {
        "nodes": n,
        "trials": trials,
        "cold_mesh_s": round(cold_mesh_s, 3),
        "from_spawn_p50_s": round(pct(from_spawn, 0.5), 3),
        "from_spawn_p95_s": round(pct(from_spawn, 0.95), 3),
        "from_ready_p50_s": round(pct(from_ready, 0.5), 3),
        "from_ready_p95_s": round(pct(from_ready, 0.95), 3),
        "spawn_to_ready_p50_s": round(statistics.median(s - r for s, r in zip(from_spawn, from_ready, strict=True)), 3),
    }


def libp2p_addrs(p: Proc) -> list[str]:
    with urllib.request.urlopen(p.url + "/mesh/self", timeout=5) as resp:
        return list(json.loads(resp.read())["addresses"]["libp2p"])


def spawn_mesh(workdir: Path, n: int, mode: str, secret: str, tag: str) -> list[Proc]:
    """N node processes in one mesh. `libp2p` mode: no mDNS and no multicast; node 0 starts first and
    the others bootstrap from it (as `--bootstrap` nodes beyond one LAN do)."""
    name = f"{tag}-{mode.replace('+', '-')}-{n}"
    if mode not in ("libp2p", "records"):
        extra = ["--libp2p-port", "0"] if mode == "mdns+libp2p" else []
        return [spawn(workdir, f"{name}-{i}", secret, extra) for i in range(n)]
    records = ["--records"] if mode == "records" else []
    first = spawn(workdir, f"{name}-0", secret, ["--no-mdns", "--libp2p-port", "0", *records])
    wait_ready([first])
    boot = libp2p_addrs(first)[0]
    rest = [spawn(workdir, f"{name}-{i}", secret, ["--no-mdns", "--bootstrap", boot, *records]) for i in range(1, n)]
    return [first, *rest]


def rest_traffic(workdir: Path, n: int, mode: str, rest_s: float, settle_s: float, mesh_timeout_s: float = 0) -> dict:
    secret = f"bench-{secrets.token_hex(8)}"
    procs = spawn_mesh(workdir, n, mode, secret, "rest")
    try:
        wait_ready(procs)
        ready_at = max(p.ready_at for p in procs)  # type: ignore[type-var]
        try:
            wait_full_mesh(procs, timeout_s=mesh_timeout_s or 60 + n, records=mode == "records")
            converged_s: float | None = time.monotonic() - ready_at
        except RuntimeError as e:  # measured all the same: a mesh too big for this box is a result too
            print(f"rest  N={n} {mode}: {e}; measuring it as it is", flush=True)
            converged_s = None
        http_ports = {p.http_port for p in procs}
        libp2p_ports = {int(a.split("/tcp/")[1].split("/")[0]) for p in procs for a in libp2p_addrs(p)}
        time.sleep(settle_s)  # let start-up bursts (announcements, first fetches, dials) pass
        traced_before = read_traces(workdir, procs)
        with LoopbackCapture(http_ports, libp2p_ports) as cap:
            time.sleep(rest_s)
        traced = trace_rates(traced_before, read_traces(workdir, procs), n)
        alive = sum(p.proc.poll() is None for p in procs)
        try:
            mesh_ok = wait_full_mesh(procs, timeout_s=5, records=mode == "records") >= 0
        except RuntimeError:
            mesh_ok = False
        listed = [len(peer_ids(p.url)) for p in procs]
    finally:
        for p in procs:
            p.stop()
    per_node = {k: round(v / n / cap.seconds, 1) for k, v in cap.bytes.items()}
    return {
        "nodes": n,
        "mode": mode,
        "converged_s": None if converged_s is None else round(converged_s, 2),  # last ready -> all list all
        "peers_listed_min_max": [min(listed), max(listed)],
        "load_avg_1m": round(os.getloadavg()[0], 2),  # the box is shared: say how busy it was
        "seconds": round(cap.seconds, 1),
        "packets_per_node_s": round(cap.packets / n / cap.seconds, 1),
        "bytes_per_node_s": round(sum(cap.bytes.values()) / n / cap.seconds, 1),
        "by_kind_bytes_per_node_s": per_node,
        "all_alive_and_meshed": alive == n and mesh_ok,
        **({"libp2p_by_protocol_per_node_s": traced} if traced else {}),
    }


def read_traces(workdir: Path, procs: list[Proc]) -> dict[str, dict]:
    """Each node's running libp2p totals (scripts/libp2p_trace_node.py); empty without --trace."""
    out: dict[str, dict] = {}
    for p in procs if TRACE else []:
        try:
            out[p.name] = json.loads(trace_path(workdir, p.name).read_text())
        except (OSError, ValueError):
            pass
    return out


def trace_rates(before: dict[str, dict], after: dict[str, dict], n: int) -> dict[str, dict[str, float]]:
    """Per protocol, per node per second over the window: bytes handed down, writes, streams opened."""
    totals: dict[str, dict[str, float]] = {}
    for name, end in after.items():
        start = before.get(name)
        if start is None or end["t"] <= start["t"]:
            continue
        seconds = end["t"] - start["t"]
        for what in ("bytes", "writes", "opened"):
            for proto, value in end[what].items():
                rate = (value - start[what].get(proto, 0)) / seconds / n
                row = totals.setdefault(proto, {"bytes": 0.0, "writes": 0.0, "opened": 0.0})
                row[what] += rate
    return {proto: {k: round(v, 2) for k, v in row.items()}
            for proto, row in sorted(totals.items(), key=lambda kv: -kv[1]["bytes"])}


# --- driver ------------------------------------------------------------------------------------------


def inner(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-discovery-"))
    can_capture = os.geteuid() == 0 and args.in_netns
    print(f"# bench_discovery on {os.cpu_count()} CPUs, loopback{' in a private netns' if args.in_netns else ''}")
    results: dict[str, list] = {"join": [], "rest": []}
    try:
        for n in [] if args.rest_only else args.sizes:
            r = join_latency(workdir, n, args.trials, [])
            results["join"].append(r)
            print(f"join  N={n}: spawn->visible p50 {r['from_spawn_p50_s']:.2f} s p95 {r['from_spawn_p95_s']:.2f} s | "
                  f"ready->visible p50 {r['from_ready_p50_s']:.2f} s p95 {r['from_ready_p95_s']:.2f} s | "
                  f"spawn->ready p50 {r['spawn_to_ready_p50_s']:.2f} s | cold mesh of {n - 1}: {r['cold_mesh_s']:.2f} s",
                  flush=True)
        if can_capture:
            for mode in args.modes:
                for n in args.sizes:
                    r = rest_traffic(workdir, n, mode, args.rest_s, args.settle_s, args.mesh_timeout_s)
                    results["rest"].append(r)
                    kinds = ", ".join(f"{k} {v:.0f}" for k, v in r["by_kind_bytes_per_node_s"].items())
                    print(f"rest  N={n} {mode}: {r['bytes_per_node_s']:.0f} B/s per node "
                          f"({r['packets_per_node_s']:.1f} pkt/s; {kinds}) over {r['seconds']:.0f} s; "
                          f"mesh intact: {r['all_alive_and_meshed']}", flush=True)
                    for proto, row in r.get("libp2p_by_protocol_per_node_s", {}).items():
                        print(f"      {proto}: {row['bytes']:.0f} B/s, {row['writes']:.1f} writes/s, "
                              f"{row['opened']:.2f} streams opened/s per node", flush=True)
        else:
            print("rest  traffic: skipped (needs root and `ip netns`, so only our nodes are on the loopback)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if results["join"]:
        worst_visible = max(r["from_spawn_p95_s"] for r in results["join"])
        worst_ready = max(r["from_ready_p95_s"] for r in results["join"])
        print(f"verdict: visible everywhere p95 {worst_visible:.2f} s from spawn, {worst_ready:.2f} s from ready "
              f"(target {TARGET_VISIBLE_P95_S:.0f} s): {'MET' if worst_visible <= TARGET_VISIBLE_P95_S else 'MISSED'}")
    if results["rest"]:
        worst_rest = max(r["bytes_per_node_s"] for r in results["rest"])
        print(f"verdict: at rest {worst_rest:.0f} B/s per node at worst (target < {TARGET_REST_BYTES_PER_S:.0f}): "
              f"{'MET' if worst_rest < TARGET_REST_BYTES_PER_S else 'MISSED'}")
        for r in results["rest"]:
            conv = "never" if r["converged_s"] is None else f"{r['converged_s']:.2f} s after the last node was ready"
            print(f"converged N={r['nodes']} {r['mode']}: {conv}; peers listed per node {r['peers_listed_min_max']} "
                  f"(load average {r['load_avg_1m']:.2f} on {os.cpu_count()} CPUs)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 8])
    parser.add_argument("--trials", type=int, default=10, help="joins measured per mesh size")
    parser.add_argument("--rest-s", type=float, default=20.0, help="seconds of traffic capture at rest")
    parser.add_argument("--settle-s", type=float, default=5.0)
    parser.add_argument("--modes", nargs="+", default=["mdns", "mdns+libp2p"],
                        choices=["mdns", "mdns+libp2p", "libp2p", "records"],
                        help="libp2p: no mDNS or multicast, every node bootstraps from the first; "
                             "records: the same with --records (holders found by DHT lookups, a sample of peers)")
    parser.add_argument("--mesh-timeout-s", type=float, default=0,
                        help="how long a mesh may take to form (default 60 s + 1 s per node)")
    parser.add_argument("--trace", action="store_true",
                        help="count py-libp2p's sent bytes by protocol in every node (scripts/libp2p_trace_node.py)")
    parser.add_argument("--rest-only", action="store_true",
                        help="only the N-process mesh at rest (traffic, convergence), no join trials")
    parser.add_argument("--json", default="", help="also write the figures here")
    parser.add_argument("--no-netns", action="store_true", help="run in the current network namespace")
    parser.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global TRACE
    TRACE = args.trace
    if args.in_netns or args.no_netns or os.geteuid() != 0 or shutil.which("ip") is None:
        inner(args)
        return 0
    ns = f"mbench{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        cmd = ["ip", "netns", "exec", ns, sys.executable, *sys.argv, "--in-netns"]
        return subprocess.run(cmd).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    sys.exit(main())
