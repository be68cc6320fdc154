"""Shared fixtures: real node processes on loopback, and a leak check on child processes."""

from __future__ import annotations

import atexit
import functools
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import interpreted_checks
import pytest
import rest_bench

if TYPE_CHECKING:
    from engine.model_file import ModelFile

REPO = Path(__file__).resolve().parent.parent


# The at-rest traffic mesh of tests/simulations/test_traffic_vs_real.py runs in the background, in a
# network namespace of its own, while the other tests run (tests/rest_bench.py says why).
def pytest_configure(config: pytest.Config) -> None:
    rest_bench.start_early(config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rest_bench.keep_if_selected(config, items)


def pytest_unconfigure(config: pytest.Config) -> None:
    rest_bench.stop(config)
    interpreted_checks.stop_all(config)


# The Triton-interpreter checks of tests/engine/ run in the background from its first test, beside the
# single-threaded engine tests (tests/interpreted_checks.py says why).
def pytest_runtest_setup(item: pytest.Item) -> None:
    interpreted_checks.start_early(item)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports for nodes come from below the kernel's ephemeral range. A port from bind(0) is ephemeral: until
# the node binds it, any outgoing connection's source port or another bind(0) (a node's gRPC port) can
# take it, and a mesh test then fails with "address already in use" (seen once on the dev box).
_PORT_LOW, _PORT_HIGH = 10000, max(10001, min(_ephemeral_low(), 65536))
_next_port = iter(range(int.from_bytes(os.urandom(2), "big"), 1 << 62))


def free_port() -> int:
    """A loopback port free now that the kernel will not hand out on its own; the walk starts at a
    random place so that concurrent test runs rarely meet."""
    for _ in range(_PORT_HIGH - _PORT_LOW):
        port = _PORT_LOW + next(_next_port) % (_PORT_HIGH - _PORT_LOW)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every one taken: an ephemeral port after all
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
    """Reads the node's output until its ready line; False if it exits or times out first.

    Reads the pipe's descriptor itself: a buffered readline() can take the ready line into the file
    object's buffer together with the line before it, and select() would then wait on an empty pipe
    until the node printed something else (or the deadline passed)."""
    fd = proc.stdout.fileno()
    pending = b""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(timeout=0.5):
                if proc.poll() is not None:
                    return False
                continue
            data = os.read(fd, 1 << 16)
            if not data:
                output.append(pending.decode(errors="replace"))
                return False
            *lines, pending = (pending + data).split(b"\n")
            output.extend(line.decode(errors="replace") + "\n" for line in lines)
            if any(b" ready at " in line for line in lines):
                if pending:
                    output.append(pending.decode(errors="replace"))
                os.set_blocking(fd, False)
                return True
    return False


def _node_cmd(data_dir: Path, name: str, port: int, args: tuple[str, ...]) -> list[str]:
    # -X faulthandler: a node that hangs on exit dumps its stacks on SIGABRT (see stop_proc);
    # MESHLLM_TEST_LOG=DEBUG shows the nodes' logs in that dump.
    return [sys.executable, "-X", "faulthandler", "-m", "node.cli", "node", "join", "--http-port", str(port),
            "--data-dir", str(data_dir), "--name", name, "--log-level", os.environ.get("MESHLLM_TEST_LOG", "WARNING"),
            *args]


DEFAULT_MODEL = "smollm2-135m-instruct"  # what a node serves when told no model


@functools.cache
def _model_cache_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="meshllm-test-model-cache-"))
    atexit.register(shutil.rmtree, path, True)
    return path


@functools.cache
def model_file(alias_or_path: str) -> ModelFile:
    """engine.model_file.load_model_file, once per test process: it hashes the whole GGUF (0.1-0.5 s).
    Its cache lands in the dir that fresh nodes' data dirs are seeded from (seed_model_cache)."""
    from engine.model_file import load_model_file

    return load_model_file(alias_or_path, _model_cache_dir())


@functools.cache
def _cached_model(alias_or_path: str) -> bool:
    """Whether `alias_or_path`'s digest and metadata are in the model-cache dir now; False if it is no
    model file (a test's bad file: the node finds out)."""
    from engine.model_file import ModelFileError

    try:
        model_file(alias_or_path)
    except (ModelFileError, OSError, ValueError):
        return False
    return True


def seed_model_cache(data_dir: Path, args: tuple[str, ...]) -> None:
    """Gives a fresh data dir the model-file cache (engine/model_file.py) of the models in `args`, as a
    node keeps it from one start to the next: its start then skips hashing the GGUF (0.1-0.5 s of CPU for
    SmolLM2 and Gemma 3) and parsing its header (0.05-0.13 s). The cache holds what the file
    says, written here by the same code; a data dir that has one already is left as it is."""
    if data_dir.exists() and any(data_dir.iterdir()):
        return
    models = {DEFAULT_MODEL}
    for flag, value in zip(args, args[1:], strict=False):
        if flag in ("--model", "--offer"):
            models.add(value)
        elif flag == "--shard":
            models.add(value.rsplit(":", 1)[0])
    if not any([_cached_model(m) for m in sorted(models)]):
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    for cached in _model_cache_dir().iterdir():
        shutil.copyfile(cached, data_dir / cached.name)


def _launch(data_dir: Path, name: str, args: tuple[str, ...], extra_env: dict[str, str] | None = None) -> NodeProc:
    seed_model_cache(data_dir, args)
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    proc = subprocess.Popen(_node_cmd(data_dir, name, port, args), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    return NodeProc(proc, name, port, data_dir)


def spawn_node(data_dir: Path, name: str, *args: str, ready_timeout_s: float = 90) -> NodeProc:
    """Starts `meshllm node join` and waits for its ready line."""
    (node,) = spawn_nodes([(data_dir, name, args)], ready_timeout_s=ready_timeout_s)
    return node


def spawn_nodes(specs: list[tuple[Path, str, tuple[str, ...]]], ready_timeout_s: float = 90,
                env: dict[str, dict[str, str]] | None = None) -> list[NodeProc]:
    """Starts one `meshllm node join` per (data dir, name, args) at once and waits for every ready line;
    `env` adds environment variables by node name.

    A node's start is mostly CPU (imports, model load: 1-5 s on one core), so starting a
    mesh's nodes together overlaps them on every core instead of adding them up; the deadline grows with
    their number to leave the same time per core. If any node fails to start, every one is stopped."""
    nodes = [_launch(data_dir, name, tuple(args), (env or {}).get(name)) for data_dir, name, args in specs]
    deadline = time.monotonic() + ready_timeout_s * max(1.0, len(nodes) / max(1, os.cpu_count() or 1))
    for node in nodes:
        if not wait_ready(node.proc, node.output, max(1.0, deadline - time.monotonic())):
            stop_all(nodes, signal.SIGKILL)
            raise RuntimeError(f"node {node.name} did not start:\n{''.join(node.output)}{node.proc.stdout.read() or ''}")
    return nodes


class NodeFactory:
    """Starts nodes for one test or one module and stops them all at its end. `factory(name, *args)` starts
    one; `factory.many({name: args})` starts several at once (see spawn_nodes)."""

    def __init__(self, make_dir: Callable[[str], Path]) -> None:
        self._make_dir = make_dir
        self.started: list[NodeProc] = []

    def __call__(self, name: str, *args: str, data_dir: Path | None = None) -> NodeProc:
        return self.many({name: args}, data_dirs={name: data_dir} if data_dir else None)[name]

    def many(self, specs: dict[str, tuple[str, ...]], data_dirs: dict[str, Path] | None = None,
             env: dict[str, dict[str, str]] | None = None) -> dict[str, NodeProc]:
        dirs = data_dirs or {}
        nodes = spawn_nodes([(dirs.get(name) or self._make_dir(name), name, args) for name, args in specs.items()],
                            env=env)
        self.started.extend(nodes)
        return {node.name: node for node in nodes}

    def stop(self) -> None:
        stop_all(self.started)


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[NodeFactory]:
    factory = NodeFactory(lambda name: tmp_path / name)
    yield factory
    factory.stop()


def stop_all(nodes: list[NodeProc], sig: int = signal.SIGTERM) -> None:
    """`sig` to every node at once, then wait: shutdowns overlap instead of adding up."""
    for node in nodes:
        if node.proc.poll() is None:
            node.proc.send_signal(sig)
    for node in nodes:
        node.stop(sig)


@pytest.fixture(scope="module")
def module_node_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeFactory]:
    factory = NodeFactory(lambda name: tmp_path_factory.mktemp(name))
    yield factory
    factory.stop()
