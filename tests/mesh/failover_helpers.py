"""Helpers for the failover tests and scripts/bench_failover.py: a pipeline mesh with spare holders of
every range, streams read token by token with their timing, faults by signal, restarts in place."""

from __future__ import annotations

import json
import secrets
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import NodeProc, spawn_node, spawn_nodes, stop_all

MODEL = "smollm2-135m-instruct"
PROMPT = "Once upon a time, in a small village by the sea, there lived"


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def active(node: NodeProc) -> int:
    return get_json(node.url + "/mesh/self")["load"]["active"]


@dataclass
class Streamed:
    """One streamed completion: its token ids, when each arrived, the node names serving it, any error."""

    served_by: str
    ids: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    finish: str | None = None
    error: dict | None = None
    status: int = 200

    def max_gap_s(self, after: float = 0.0) -> float:
        stamps = [t for t in self.times if t >= after]
        prior = [t for t in self.times if t < after]
        if prior:
            stamps = [prior[-1], *stamps]
        return max((b - a for a, b in zip(stamps, stamps[1:], strict=False)), default=0.0)


def open_stream(url: str, body: dict) -> tuple[Streamed, Iterator[dict]]:
    """Starts a streamed completion; returns its record and an iterator of its events (filling the record)."""
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    resp = urllib.request.urlopen(req, timeout=120)
    record = Streamed(resp.headers.get("X-Meshllm-Node", ""))

    def events() -> Iterator[dict]:
        with resp:
            for line in resp:
                if line.startswith(b"data: [DONE]"):
                    return
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    record.error = event["error"]
                    yield event
                    continue
                for choice in event["choices"]:
                    ids = choice.get("token_ids") or []
                    record.ids.extend(ids)
                    record.times.extend([time.monotonic()] * len(ids))
                    record.finish = choice["finish_reason"] or record.finish
                yield event

    return record, events()


def run_stream(url: str, body: dict, *, fault=None, after_tokens: int = 8) -> tuple[Streamed, float | None]:
    """Streams `body`; calls `fault(record)` once `after_tokens` ids arrived. Returns the record and the
    fault's time (monotonic)."""
    try:
        record, events = open_stream(url, body)
    except urllib.error.HTTPError as e:
        return Streamed("", status=e.code, error={"message": e.read().decode(errors="replace")}), None
    fault_at = None
    for _ in events:
        if fault is not None and fault_at is None and len(record.ids) >= after_tokens:
            fault(record)
            fault_at = time.monotonic()
    return record, fault_at


def restart(node: NodeProc, args: tuple[str, ...]) -> NodeProc:
    """The same node (its data dir keeps its key: the same node id) started again after it died."""
    node.stop(signal.SIGKILL)
    fresh = spawn_node(node.data_dir, node.name, *args)
    node.proc, node.http_port, node.output = fresh.proc, fresh.http_port, fresh.output
    return node


def wait_until(check, timeout_s: float, what: str, every_s: float = 0.1) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{what} not within {timeout_s} s")
        time.sleep(every_s)
    return time.monotonic() - started


def mesh_sees(gateway: NodeProc, names: set[str]) -> bool:
    """Whether the gateway's model listing names every one of these nodes."""
    try:
        models = get_json(gateway.url + "/v1/models")["data"]
    except OSError:
        return False
    return any(names <= set(m["meshllm"].get("nodes", [])) for m in models)


def knows(node: NodeProc, name: str, since: float) -> bool:
    """Whether `node` holds an advert of `name` issued after `since` (wall time)."""
    try:
        return any(r["name"] == name and r.get("issued_at", 0) >= since for r in get_json(node.url + "/mesh/peers"))
    except OSError:
        return False


PIPELINE = {"A": "0-5", "B": "5-17", "C": "17-30"}  # two holders of each range


class Mesh:
    """A gateway holding nothing and, per entry of `holders` (name -> node args), a node of one mesh."""

    def __init__(self, make_dir: Callable[[str], Path], holders: dict[str, tuple[str, ...]]) -> None:
        self.secret = "fo-" + secrets.token_hex(4)
        self.args = {name: (*args, "--mesh-secret", self.secret) for name, args in holders.items()}
        self.nodes: dict[str, NodeProc] = {}
        self.reference: dict[str, Streamed] = {}
        specs = [(make_dir("G"), "G", ("--no-model", "--mesh-secret", self.secret))]
        specs += [(make_dir(name), name, args) for name, args in self.args.items()]
        self.gateway, *holders = spawn_nodes(specs)  # started together (see spawn_nodes)
        self.nodes = {node.name: node for node in holders}
        self.wait_seen(set(self.nodes), since=0.0)

    @classmethod
    def pipeline(cls, make_dir: Callable[[str], Path]) -> Mesh:
        return cls(make_dir, {f"{letter}{i}": ("--shard", f"{MODEL}:{layers}", "--threads", "1")
                              for letter, layers in PIPELINE.items() for i in (1, 2)})

    @classmethod
    def whole(cls, make_dir: Callable[[str], Path]) -> Mesh:
        return cls(make_dir, {f"W{i}": ("--engine", "torch", "--threads", "1") for i in (1, 2)})

    def wait_seen(self, names: set[str], since: float, timeout_s: float = 30) -> None:
        """Until the gateway holds an advert issued after `since` (wall time) from each of `names`."""
        def seen() -> bool:
            rows = get_json(self.gateway.url + "/mesh/peers")
            return names <= {r["name"] for r in rows if r.get("issued_at", 0) >= since and r.get("models")}
        wait_until(seen, timeout_s, f"the gateway seeing {sorted(names)}")

    @staticmethod
    def chain(served_by: str) -> list[str]:
        return served_by.split("+")

    def restart(self, name: str) -> None:
        """Restarts `name` in place; returns once every live node holds its new advert (address and
        certificate), without waiting for it to hear of them: its server refuses members it has not heard
        of, and the callers' fresh channels must ride that out (issue 14, channels.FRESH_CONNECT_S)."""
        since = time.time()
        restart(self.nodes[name], self.args[name])
        for node in [self.gateway, *(p for n, p in self.nodes.items() if n != name and p.proc.poll() is None)]:
            wait_until(lambda node=node: node.proc.poll() is not None or knows(node, name, since), 30,
                       f"{node.name} seeing {name} again")

    def wait_sessions_freed(self, timeout_s: float = 10) -> float:
        return wait_until(lambda: all(active(n) == 0 for n in self.nodes.values() if n.proc.poll() is None),
                          timeout_s, "every stage freeing its sessions")

    def stop(self) -> None:
        stop_all([self.gateway, *self.nodes.values()])
