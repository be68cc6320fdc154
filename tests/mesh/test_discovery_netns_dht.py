"""Two nodes in separate network namespaces, mDNS off, meet through libp2p given one --bootstrap."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from discovery_mesh_helpers import mesh_secret
from discovery_netns_hosts import NsNode, netns_skip_reason, spawn_in_ns, veth_hosts

LIBP2P_PORT = 4701
MEET_TIMEOUT_S = 20.0

pytestmark = pytest.mark.skipif(netns_skip_reason() is not None, reason=str(netns_skip_reason()))


def _peers(node: NsNode) -> list[dict]:
    rows = node.get_json("/mesh/peers")
    return rows if isinstance(rows, list) else []


def test_two_namespaces_meet_through_bootstrap_without_mdns(tmp_path: Path) -> None:
    secret = mesh_secret("netns")
    args = ("--no-model", "--no-mdns", "--mesh-secret", secret, "--libp2p-port", str(LIBP2P_PORT))
    nodes: list[NsNode] = []
    with veth_hosts() as (host_a, host_b):
        try:
            a = spawn_in_ns(host_a, tmp_path / "a", "ns-a", *args)
            nodes.append(a)
            me_a = a.get_json("/mesh/self")
            assert isinstance(me_a, dict)
            boot = me_a["addresses"]["libp2p"]
            assert boot == [f"/ip4/{host_a.ip}/tcp/{LIBP2P_PORT}/p2p/{boot[0].rsplit('/', 1)[1]}"]
            b = spawn_in_ns(host_b, tmp_path / "b", "ns-b", *args, "--bootstrap", boot[0])
            nodes.append(b)
            t0 = time.monotonic()
            me_b = b.get_json("/mesh/self")
            assert isinstance(me_b, dict)
            while True:
                seen_by_a, seen_by_b = _peers(a), _peers(b)
                if [r["node_id"] for r in seen_by_a] == [me_b["node_id"]] and [
                    r["node_id"] for r in seen_by_b
                ] == [me_a["node_id"]]:
                    break
                assert time.monotonic() - t0 < MEET_TIMEOUT_S, "the namespaces never met through libp2p"
                time.sleep(0.2)
            print(f"met through libp2p {time.monotonic() - t0:.2f} s after b was ready")
            assert {r["source"] for r in seen_by_a + seen_by_b} == {"libp2p"}
            assert seen_by_a[0]["addresses"]["http"] == f"{host_b.ip}:8600"
            assert seen_by_b[0]["addresses"]["libp2p"] == boot
            assert seen_by_a[0]["addresses"]["libp2p"] == me_b["addresses"]["libp2p"]
            # a clean shutdown travels as a signed goodbye over gossipsub
            b.proc.send_signal(signal.SIGTERM)
            t1 = time.monotonic()
            while _peers(a):
                assert time.monotonic() - t1 < 1.5, "b's goodbye did not reach a within 1.5 s"
                time.sleep(0.1)
        finally:
            for node in nodes:
                node.stop()
