"""SIGINT and SIGTERM stop a node cleanly: exit code 0, quickly, its ports released."""

from __future__ import annotations

import signal
import socket
import time

import pytest


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_the_node_cleanly(node_factory, sig):
    node = node_factory(f"stop-{sig.name}", "--no-model", "--mesh-secret", f"shutdown-{sig.name}")
    started = time.monotonic()
    assert node.stop(sig) == 0
    assert time.monotonic() - started < 5
    assert "Traceback" not in "".join(node.output) + (node.proc.stdout.read() or "")
    with socket.socket() as s:  # the HTTP port is free again (peers' fetches may leave TIME_WAIT)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", node.http_port))
