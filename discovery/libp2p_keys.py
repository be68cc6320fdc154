"""The node's libp2p key pair (its own Ed25519 key: the peer id follows from the node id's key), peer id
and the multiaddrs it announces."""

from __future__ import annotations

from libp2p.crypto.ed25519 import Ed25519PrivateKey as P2PPrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from discovery.identity import Identity


def libp2p_key_pair(identity: Identity) -> KeyPair:
    private = P2PPrivateKey.from_bytes(identity.private_key_raw)
    return KeyPair(private, private.get_public_key())


def peer_id_of(identity: Identity) -> str:
    return ID.from_pubkey(libp2p_key_pair(identity).public_key).to_base58()


def own_addrs(host: object, port: int, announce_ips: list[str], peer_id: str) -> list[str]:
    """Full multiaddrs (ending in /p2p/<peer id>) on the port the host listens on, one per announced IP."""
    for addr in host.get_addrs():  # type: ignore[attr-defined]
        tcp = addr.value_for_protocol("tcp")
        if tcp:
            port = int(tcp)
            break
    return [f"/ip4/{ip}/tcp/{port}/p2p/{peer_id}" for ip in announce_ips]
