"""Two network namespaces joined by a veth pair, and `meshllm node join` run inside one of them.

Needs root and `ip netns`; `netns_skip_reason()` says why not when either is missing. Names carry
the pid and a random tag, so concurrent runs never collide, and everything is removed on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from conftest import REPO, stop_proc, wait_ready


def netns_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "`ip netns` is not available here"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass(frozen=True)
class Host:
    ns: str
    ip: str


@contextlib.contextmanager
def veth_hosts() -> Iterator[tuple[Host, Host]]:
    """Two namespaces, each with lo up and one end of a veth pair on 10.<a>.<b>.1/.2 /24."""
    tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
    ns = (f"mdisc{tag}a", f"mdisc{tag}b")
    veth = (f"vd{tag}a", f"vd{tag}b")  # interface names: at most 15 characters
    subnet = f"10.{secrets.randbelow(200) + 20}.{secrets.randbelow(250) + 1}"
    hosts = (Host(ns[0], f"{subnet}.1"), Host(ns[1], f"{subnet}.2"))
    created: list[str] = []
    try:
        for name in ns:
            _ip("netns", "add", name)
            created.append(name)
        _ip("link", "add", veth[0], "netns", ns[0], "type", "veth", "peer", "name", veth[1], "netns", ns[1])
        for host, dev in zip(hosts, veth, strict=True):
            _ip("-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", dev)
            _ip("-n", host.ns, "link", "set", dev, "up")
            _ip("-n", host.ns, "link", "set", "lo", "up")
        yield hosts
    finally:
        for name in created:  # deleting a namespace deletes its end of the veth pair too
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@dataclass
class NsNode:
    proc: subprocess.Popen
    host: Host
    http_port: int
    output: list[str] = field(default_factory=list)
    http_host: str = ""  # where its HTTP listens inside the namespace; default: the veth address

    @property
    def url(self) -> str:
        return f"http://{self.http_host or self.host.ip}:{self.http_port}"

    def get_json(self, path: str) -> object:
        """GET url+path from inside the node's namespace; None when it does not answer."""
        done = subprocess.run(
            ["ip", "netns", "exec", self.host.ns, "curl", "-sf", "--max-time", "5", self.url + path],
            capture_output=True,
            timeout=15,
        )
        return json.loads(done.stdout) if done.returncode == 0 else None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20) -> None:
        stop_proc(self.proc, sig, timeout_s)


def spawn_in_ns(
    host: Host, data_dir: Path, name: str, *args: str, ready_timeout_s: float = 90, http_host: str = ""
) -> NsNode:
    """`ip netns exec NS python -m node.cli node join ...` (ip execs, so proc is the node itself).

    HTTP listens on the veth address (the API open: these tests are about the mesh) unless
    `http_host` says otherwise (e.g. "127.0.0.1" for a node with default settings)."""
    port = 8600  # each namespace has its own port space
    where = ["--http-host", http_host] if http_host else ["--http-host", host.ip, "--api-open"]
    cmd = ["ip", "netns", "exec", host.ns, sys.executable, "-m", "node.cli", "node", "join",
           *where, "--http-port", str(port), "--data-dir", str(data_dir),
           "--name", name, "--log-level", "WARNING", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    node = NsNode(proc, host, port, http_host=http_host)
    if wait_ready(proc, node.output, ready_timeout_s):
        return node
    node.stop(signal.SIGKILL)
    raise RuntimeError(f"node {name} did not start in {host.ns}:\n{''.join(node.output)}")
