"""Shared fixtures: real node processes on loopback, and a leak check on child processes."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class NodeProc:
    proc: subprocess.Popen
    name: str
    http_port: int
    data_dir: Path
    output: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20) -> int:
        return stop_proc(self.proc, sig, timeout_s)


def stop_proc(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 20) -> int:
    """Signals the process, waits, and kills it if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            # A hung node: SIGABRT makes faulthandler (-X faulthandler) dump every thread's stack.
            proc.send_signal(signal.SIGABRT)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                print(f"process {proc.args!r} hung on exit; its last output:\n{(proc.stdout.read() or '')[-8000:]}",
                      file=sys.stderr)
    return proc.returncode


def wait_ready(proc: subprocess.Popen, output: list[str], timeout_s: float) -> bool:
    """Reads the node's output until its ready line; False if it exits or times out first."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not sel.select(timeout=0.5):
            if proc.poll() is not None:
                return False
            continue
        line = proc.stdout.readline()
        if not line:
            return False
        output.append(line)
        if " ready at " in line:
            os.set_blocking(proc.stdout.fileno(), False)
            return True
    return False


def spawn_node(data_dir: Path, name: str, *args: str, ready_timeout_s: float = 90) -> NodeProc:
    """Starts `meshllm node join` and waits for its ready line."""
    port = free_port()
    # -X faulthandler: a node that hangs on exit dumps its stacks on SIGABRT (see stop_proc);
    # MESHLLM_TEST_LOG=DEBUG shows the nodes' logs in that dump.
    cmd = [sys.executable, "-X", "faulthandler", "-m", "node.cli", "node", "join", "--http-port", str(port),
           "--data-dir", str(data_dir), "--name", name, "--log-level", os.environ.get("MESHLLM_TEST_LOG", "WARNING"), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    node = NodeProc(proc, name, port, data_dir)
    if wait_ready(proc, node.output, ready_timeout_s):
        return node
    node.stop(signal.SIGKILL)
    raise RuntimeError(f"node {name} did not start:\n{''.join(node.output)}{proc.stdout.read() or ''}")


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeProc]]:
    started: list[NodeProc] = []

    def make(name: str, *args: str, data_dir: Path | None = None) -> NodeProc:
        node = spawn_node(data_dir or tmp_path / name, name, *args)
        started.append(node)
        return node

    yield make
    stop_all(started)


def stop_all(nodes: list[NodeProc]) -> None:
    """SIGTERM to every node at once, then wait: shutdowns overlap instead of adding up."""
    for node in nodes:
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
    for node in nodes:
        node.stop()


@pytest.fixture(scope="module")
def module_node_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., NodeProc]]:
    started: list[NodeProc] = []

    def make(name: str, *args: str) -> NodeProc:
        node = spawn_node(tmp_path_factory.mktemp(name), name, *args)
        started.append(node)
        return node

    yield make
    stop_all(started)
