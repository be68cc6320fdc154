"""Weight transfer (issue 13): throughput against the link, two sources against one, cold vs warm.

  .venv/bin/python -m scripts.bench_weights transfer            # loopback + tc-shaped veth namespaces
  .venv/bin/python -m scripts.bench_weights ttft                # cold vs warm first token, real nodes

`transfer` runs the very server and fetcher nodes use (`dataplane/weights.py` FetchTensors served from
the whole file; `shard/fetch.py` over `dataplane/weights_client.GrpcSource`, every piece verified and
written to a sparse cache file) between processes: on loopback, then in network namespaces where each
source reaches the receiver over its own veth pair shaped with `tc tbf` on the source's egress (the
kernel here has no netem, so no delay). Plaintext gRPC with the mesh token (mTLS costs within noise on
the data plane, docs/benchmarks.md). `ttft` starts a gateway, a holder and two empty nodes on loopback
(as tests/mesh/test_weights_mesh.py does) and times the first answer cold (fetch + load) and after a
restart of every node (load from the cache), then against nodes given the file itself (--offer).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKEN = "bench-weights-token"
PORT = 7811


# --- the server (one process per source) ----------------------------------------------------------------
async def _serve(model: str, port: int, streams: int) -> None:
    from dataplane.rpc import build_server
    from dataplane.weights import Served, WeightsService
    from engine.model_file import load_model_file
    from shard.manifest import build_manifest

    m = load_model_file(model)
    manifest = build_manifest(m.path, m.digest, m.alias)
    path = m.path

    def read(piece):  # noqa: ANN001
        with open(path, "rb") as f:
            f.seek(piece.offset)
            return f.read(piece.length)

    served = Served(manifest, manifest.encode(), lambda i: True, read, tuple(manifest.all_pieces()))
    service = WeightsService(lambda d: served if d == m.digest else None, TOKEN, streams)
    server = build_server(service.handlers())
    server.add_insecure_port(f"0.0.0.0:{port}")
    await server.start()
    print("serving", flush=True)
    await server.wait_for_termination()


# --- the receiver ------------------------------------------------------------------------------------
async def _fetch(model: str, addresses: list[str], out_dir: str, streams: int) -> dict:
    from dataplane.channels import Endpoint, PeerChannels
    from dataplane.weights_client import GrpcSource, fetch_manifest
    from engine.model_file import load_model_file
    from shard.fetch import FetchProgress, fetch_pieces
    from shard.weight_cache import WeightCache

    m = load_model_file(model)
    ids = {f"src{i}": a for i, a in enumerate(addresses)}
    channels = PeerChannels(TOKEN, directory=lambda n: Endpoint(ids[n], "") if n in ids else None)
    from shard.manifest import build_manifest

    manifest_id = build_manifest(m.path, m.digest, m.alias).manifest_id
    t0 = time.perf_counter()
    manifest = await fetch_manifest(channels, "src0", m.digest, manifest_id)
    cache = WeightCache(Path(out_dir))
    entry = cache.open(manifest, m.alias)
    pieces = manifest.all_pieces()
    progress = FetchProgress("bench", sum(p.length for p in pieces))
    sources = [GrpcSource(channels, n, m.digest, lambda i: True, streams) for n in ids]
    t1 = time.perf_counter()
    await fetch_pieces(manifest, pieces, sources, entry.write, progress, lambda *a: print("bad", a, file=sys.stderr))
    entry.flush()
    t2 = time.perf_counter()
    await channels.close()
    return {"bytes": progress.done_bytes, "seconds": t2 - t1, "manifest_s": t1 - t0,
            "MB_s": progress.done_bytes / (t2 - t1) / 1e6, "by_source": progress.by_source}


# --- orchestration ------------------------------------------------------------------------------------
def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@contextlib.contextmanager
def _star(n_sources: int, rate: str | None) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """A receiver namespace joined to n source namespaces by one veth pair each, shaped at `rate`."""
    tag = f"{os.getpid() % 10000}{secrets.token_hex(2)}"
    recv = f"bwr{tag}"
    made = []
    try:
        _ip("netns", "add", recv)
        made.append(recv)
        _ip("-n", recv, "link", "set", "lo", "up")
        sources = []
        for i in range(n_sources):
            ns, a, b = f"bws{tag}{i}", f"bwa{tag}{i}", f"bwb{tag}{i}"
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("link", "add", a, "netns", ns, "type", "veth", "peer", "name", b, "netns", recv)
            src_ip, dst_ip = f"10.77.{i}.1", f"10.77.{i}.2"
            _ip("-n", ns, "addr", "add", f"{src_ip}/24", "dev", a)
            _ip("-n", recv, "addr", "add", f"{dst_ip}/24", "dev", b)
            for where, dev in ((ns, a), (recv, b)):
                _ip("-n", where, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if rate:
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", a, "root", "tbf", "rate", rate,
                                "burst", "256kb", "latency", "50ms"], check=True, capture_output=True)
            sources.append((ns, src_ip))
        yield recv, sources
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def _run_transfer(model: str, sources: list[tuple[str | None, str]], recv_ns: str | None, streams: int) -> dict:
    procs: list[subprocess.Popen] = []
    try:
        for ns, _ in sources:
            cmd = [sys.executable, "-m", "scripts.bench_weights", "serve", "--model", model, "--port", str(PORT),
                   "--streams", str(streams)]
            if ns:
                cmd = ["ip", "netns", "exec", ns, *cmd]
            else:
                cmd[cmd.index(str(PORT))] = str(PORT + len(procs))
            procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True))
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "serving"
        addrs = [f"{ip}:{PORT if ns else PORT + i}" for i, (ns, ip) in enumerate(sources)]
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "scripts.bench_weights", "fetch", "--model", model, "--out", out,
                   "--streams", str(streams), *addrs]
            if recv_ns:
                cmd = ["ip", "netns", "exec", recv_ns, *cmd]
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=True)
            return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def _rate_bits(rate: str) -> float:
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3}
    for u, f in units.items():
        if rate.endswith(u):
            return float(rate[: -len(u)]) * f
    raise ValueError(rate)


def transfer(model: str, repeats: int, streams: int) -> None:
    rows: list[tuple[str, str, float | None, dict]] = []
    for _ in range(repeats):
        r = _run_transfer(model, [(None, "127.0.0.1")], None, streams)
        rows.append(("loopback", "1 source", None, r))
        r = _run_transfer(model, [(None, "127.0.0.1"), (None, "127.0.0.1")], None, streams)
        rows.append(("loopback", "2 sources", None, r))
    if os.geteuid() == 0 and shutil.which("tc"):
        for rate in ("1gbit", "200mbit"):
            for n in (1, 2):
                for _ in range(repeats):
                    with _star(n, rate) as (recv, srcs):
                        r = _run_transfer(model, [(ns, ip) for ns, ip in srcs], recv, streams)
                    rows.append((f"veth tbf {rate}", f"{n} source{'s' * (n > 1)}", _rate_bits(rate), r))
    print(f"{'link':<20} {'sources':<10} {'MB/s':>8} {'% of one link':>14} {'s':>6}")
    for link, what, bits, r in rows:
        pct = f"{100 * r['MB_s'] * 8e6 / bits:.0f}%" if bits else "-"
        print(f"{link:<20} {what:<10} {r['MB_s']:>8.1f} {pct:>14} {r['seconds']:>6.2f}")
    print(json.dumps([{"link": a, "sources": b, "MB_s": round(r["MB_s"], 1), "seconds": round(r["seconds"], 3)}
                      for a, b, _, r in rows]))


def ttft(model: str) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import spawn_node, stop_all  # the tests' own node launcher

    def first_answer(url: str) -> float:
        import urllib.request

        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}
        req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as resp:
            resp.read()
        return time.perf_counter() - t0

    def mesh(root: Path, secret: str, empties_offer: bool) -> list:
        args = ("--mesh-secret", secret, "--kv-sessions", "1", "--threads", "1")
        budget = ("--memory-budget", "80000000")
        g = spawn_node(root / "G", "G", "--no-model", "--mesh-secret", secret)
        h = spawn_node(root / "H", "H", "--offer", model, *budget, *args)
        es = [spawn_node(root / f"E{i}", f"E{i}", *(("--offer", model) if empties_offer else ("--no-model",)), *budget, *args)
              for i in (1, 2)]
        deadline = time.monotonic() + 30
        while len(json.loads(__import__("urllib.request").request.urlopen(g.url + "/mesh/peers").read())) < 3:
            if time.monotonic() > deadline:
                raise RuntimeError("peers never met")
            time.sleep(0.2)
        return [g, h, *es]

    with tempfile.TemporaryDirectory() as tmp:
        root, secret = Path(tmp), "bw-" + secrets.token_hex(4)
        nodes = mesh(root, secret, False)
        cold = first_answer(nodes[0].url)
        stop_all(nodes)
        nodes = mesh(root, secret, False)
        warm = first_answer(nodes[0].url)
        stop_all(nodes)
        nodes = mesh(root / "local", secret + "x", True)
        local = first_answer(nodes[0].url)
        stop_all(nodes)
    print(f"first answer through a 3-stage pipeline: cold (fetch + load) {cold:.2f} s, warm (cache) {warm:.2f} s, "
          f"every node with the file {local:.2f} s")
    print(json.dumps({"cold_s": round(cold, 2), "warm_s": round(warm, 2), "local_file_s": round(local, 2)}))


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--model", default="smollm2-135m-instruct")
    s.add_argument("--port", type=int, default=PORT)
    s.add_argument("--streams", type=int, default=4)
    f = sub.add_parser("fetch")
    f.add_argument("--model", default="smollm2-135m-instruct")
    f.add_argument("--out", required=True)
    f.add_argument("--streams", type=int, default=4)
    f.add_argument("addresses", nargs="+")
    t = sub.add_parser("transfer")
    t.add_argument("--model", default="smollm2-135m-instruct")
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--streams", type=int, default=4)
    w = sub.add_parser("ttft")
    w.add_argument("--model", default="smollm2-135m-instruct")
    a = p.parse_args()
    if a.cmd == "serve":
        asyncio.run(_serve(a.model, a.port, a.streams))
    elif a.cmd == "fetch":
        print(json.dumps(asyncio.run(_fetch(a.model, a.addresses, a.out, a.streams))))
    elif a.cmd == "transfer":
        transfer(a.model, a.repeats, a.streams)
    else:
        ttft(a.model)


if __name__ == "__main__":
    main()
