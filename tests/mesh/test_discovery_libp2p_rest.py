"""libp2p only (`--no-mdns`), real processes on loopback: at rest a peer is kept alive by signed
heartbeats alone (no full advert for 30 s) for more than two ttl periods, and a SIGKILLed node still
leaves every table within ttl + 2 s.

The nodes run with a 4 s ttl (`--advert-ttl-s`, beats every 1 s) instead of the default 10 s (beats
every 2.5 s): the same schedule at the same ratio, and the rest and the expiry it checks take 15 s
instead of 35 s."""

from __future__ import annotations

import signal
import time

from conftest import NodeFactory
from discovery_mesh_helpers import (
    get_json,
    hold_for,
    mesh_secret,
    node_id,
    peer_ids,
    peer_ids_strict,
    wait_for,
)

TTL_S = 4.0  # --advert-ttl-s: the rest stays well inside the 30 s between full adverts
KILL_BOUND_S = TTL_S + 2.0
REST_S = 2 * TTL_S + 3.0


def test_libp2p_peer_stays_at_rest_and_expires_after_sigkill(node_factory: NodeFactory) -> None:
    secret = mesh_secret("p2prest")
    args = ("--no-model", "--no-mdns", "--libp2p-port", "0", "--mesh-secret", secret, "--advert-ttl-s", str(TTL_S))
    a = node_factory("p2p-a", *args)
    boot = get_json(a.url + "/mesh/self")["addresses"]["libp2p"][0]
    started = node_factory.many({name: (*args, "--bootstrap", boot) for name in ("p2p-b", "p2p-c")})
    b, c = started["p2p-b"], started["p2p-c"]
    ids = {n.name: node_id(n.url) for n in (a, b, c)}
    everyone = set(ids.values())

    def complete() -> bool:
        return all(peer_ids(n.url) == everyone - {ids[n.name]} for n in (a, b, c))

    wait_for(complete, 15.0, "3 libp2p-only nodes see each other")
    hold_for(complete, REST_S, "every peer stays in every table at rest")
    for n in (a, b, c):
        rows = get_json(n.url + "/mesh/peers")
        assert all(r["source"] == "libp2p" and r["last_seen_s"] < TTL_S / 2 for r in rows), rows

    t0 = time.monotonic()
    c.proc.send_signal(signal.SIGKILL)

    def gone() -> bool:
        tables = [peer_ids_strict(n.url) for n in (a, b)]
        return all(t is not None and ids[c.name] not in t for t in tables)

    left_s = wait_for(gone, KILL_BOUND_S + 5, "the SIGKILLed node leaves")
    elapsed = time.monotonic() - t0
    assert elapsed <= KILL_BOUND_S, f"SIGKILL: left after {elapsed:.2f} s"
    assert everyone - {ids[c.name], ids[a.name]} == peer_ids(a.url)  # the living stay
    print(f"at rest {REST_S:.0f} s with heartbeats only; SIGKILL left every table in {left_s:.2f} s")
