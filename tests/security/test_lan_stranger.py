"""Finding 2 of issue 11: a default node (HTTP and gRPC on loopback) takes nothing from the LAN.

Two network namespaces joined by a veth pair. In one, a node with default settings (and a known
mesh secret, the worst case); in the other, a stranger that advertises the node's model over mDNS
and multicast, and sends datagrams straight at it. The node must never list the stranger, never
connect to it (no prompts reach it), and keep serving its own users.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mesh"))
from conftest import REPO  # noqa: E402
from discovery_netns_hosts import netns_skip_reason, spawn_in_ns, veth_hosts  # noqa: E402

pytestmark = pytest.mark.skipif(netns_skip_reason() is not None, reason=str(netns_skip_reason()))
STRANGER = Path(__file__).with_name("lan_stranger.py")
ALIAS = "smollm2-135m-instruct"


def _curl(ns: str, *args: str) -> tuple[int, str]:
    done = subprocess.run(["ip", "netns", "exec", ns, "curl", "-s", "--max-time", "10",
                           "-o", "/dev/stdout", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=20)
    body, _, code = done.stdout.rpartition("\n")
    return int(code or 0), body


def test_default_node_ignores_a_lan_stranger_advertising_its_model(tmp_path: Path) -> None:
    secret = "known-to-the-stranger"
    with veth_hosts() as (host_a, host_b):
        node = spawn_in_ns(host_a, tmp_path / "a", "victim", "--no-model", "--mesh-secret", secret,
                           http_host="127.0.0.1")
        try:
            stranger = subprocess.Popen(
                ["ip", "netns", "exec", host_b.ns, sys.executable, str(STRANGER), host_b.ip, host_a.ip, secret, "8"],
                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
            )
            chats = []
            for _ in range(10):
                chats.append(_curl(host_a.ns, "-X", "POST", "-H", "Content-Type: application/json", "-d",
                                   json.dumps({"model": ALIAS, "messages": [{"role": "user", "content": "secret prompt"}]}),
                                   node.url + "/v1/chat/completions")[0])
                subprocess.run(["sleep", "0.5"])
            out, _ = stranger.communicate(timeout=30)
            assert "connections=0" in out, out  # no fetch, no gRPC: the stranger read no prompt
            assert all(code != 200 for code in chats), chats  # nobody holds the model: no one answered
            assert node.get_json("/mesh/peers") == []
            me = node.get_json("/mesh/self")
            assert isinstance(me, dict)
            assert me["rejected_adverts"] == {}, "nothing from the LAN even reached discovery"
            assert node.get_json("/health") == {"status": "ok"}
            # and nothing of ours listens on the LAN side
            listening = subprocess.run(["ip", "netns", "exec", host_a.ns, "ss", "-lntupH"],
                                       capture_output=True, text=True, timeout=10).stdout
            for line in listening.splitlines():
                local = line.split()[4]
                assert local.startswith(("127.", "239.255.77.77:", "[::1]", "[::ffff:127.")), line
        finally:
            node.stop()
