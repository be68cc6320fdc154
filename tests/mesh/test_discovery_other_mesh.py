"""A node with another mesh secret on the same LAN never appears, and its adverts are counted as rejected."""

from __future__ import annotations

from collections.abc import Callable

from conftest import NodeProc
from discovery_mesh_helpers import (
    get_json,
    hold_for,
    mesh_secret,
    node_id,
    peer_ids,
    start_parallel,
    wait_for,
)

# Both nodes beat every 1 s (--advert-ttl-s 4, a quarter of it) instead of every 2.5 s: the watch sees
# three multicast adverts of the other mesh in 3 s, more than the 6 s watch saw at the default.
TTL_S = 4.0
WATCH_S = 3.0


def test_other_mesh_never_appears_and_is_counted(node_factory: Callable[..., NodeProc]) -> None:
    (ours, _), (theirs, _) = start_parallel(
        node_factory,
        [("mesh-a", "--no-model", "--mesh-secret", mesh_secret("a"), "--advert-ttl-s", str(TTL_S)),
         ("mesh-b", "--no-model", "--mesh-secret", mesh_secret("b"), "--advert-ttl-s", str(TTL_S))],
    )
    ours_id, theirs_id = node_id(ours.url), node_id(theirs.url)

    def other_mesh_rejects(node: NodeProc) -> int:
        return get_json(node.url + "/mesh/self")["rejected_adverts"].get("other_mesh", 0)

    def apart() -> bool:
        return theirs_id not in peer_ids(ours.url) and ours_id not in peer_ids(theirs.url)

    # each fetches the other's advert as soon as mDNS points at it, and refuses it on the HMAC
    wait_for(lambda: other_mesh_rejects(ours) > 0 and other_mesh_rejects(theirs) > 0, 10.0, "other_mesh counted")
    hold_for(apart, WATCH_S, "a node of another mesh appeared in a peer table")
    assert peer_ids(ours.url) == set() and peer_ids(theirs.url) == set()
    assert other_mesh_rejects(ours) >= 2  # it keeps trying every refresh, and keeps being refused
