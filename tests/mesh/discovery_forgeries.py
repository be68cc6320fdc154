"""Forged advert envelopes, built with the discovery package's own encoders, keyed by the reason a
receiver must give when it refuses them. A unique module name: tests/ has no __init__.py."""

from __future__ import annotations

import dataclasses
import time

import msgpack

from discovery.advert import Addresses, Load, NodeAdvert, Resources, advert_to_dict
from discovery.envelope import _SIGN_DOMAIN, MAX_ENVELOPE_BYTES, _mac, encode_signed
from discovery.identity import Identity


def advert_of(identity: Identity, *, seq: int | None = None, issued_at: float | None = None, **changes: object) -> NodeAdvert:
    now = time.time()
    advert = NodeAdvert(
        node_id=identity.node_id,
        name="forger-" + identity.node_id[:6],
        version="0.1.0",
        public_key=identity.public_key_raw,
        addresses=Addresses(http="127.0.0.1:1", grpc="", libp2p=()),
        models=(),
        resources=Resources("cpu", 0, 0, 8 << 30, 4 << 30, 0.0),
        load=Load(active=0, queued=0, capacity=0),
        seq=int(now * 1000) if seq is None else seq,
        issued_at=now if issued_at is None else issued_at,
        ttl_s=10.0,
    )
    return dataclasses.replace(advert, **changes) if changes else advert


def signed(identity: Identity, mesh_key: bytes, **changes: object) -> bytes:
    """A genuine envelope: what an honest member would send."""
    return encode_signed(advert_of(identity, **changes), identity, mesh_key)


def raw_envelope(fields: dict, signer: Identity, mesh_key: bytes, *, signature: bytes | None = None) -> bytes:
    """Signs and MACs any payload dict, bypassing encode_signed's refusal to send bad adverts."""
    payload = msgpack.packb(fields, use_bin_type=True)
    sig = signer.sign(_SIGN_DOMAIN + payload) if signature is None else signature
    return msgpack.packb([1, payload, sig, _mac(mesh_key, payload)], use_bin_type=True)


def forgeries(mesh_key: bytes, victim_id: str, forger: Identity) -> dict[str, bytes]:
    """reason -> envelope. The forger holds the mesh key (a member gone bad); garbage needs none."""
    fields = advert_to_dict(advert_of(forger))
    good_sig = msgpack.unpackb(signed(forger, mesh_key), raw=False)[2]
    return {
        # a valid MAC, but the signature belongs to another payload
        "bad_signature": raw_envelope(
            {**fields, "name": "tampered"}, forger, mesh_key, signature=good_sig
        ),
        # the forger's key signs an advert that claims the victim's node id
        "id_mismatch": raw_envelope({**fields, "node_id": victim_id, "name": "impostor"}, forger, mesh_key),
        "oversized": b"\x93" + b"\x00" * (MAX_ENVELOPE_BYTES + 4096),
        "malformed": b"\xc1" * 64 + b"not msgpack at all",
        "bad_type": raw_envelope({**fields, "name": 12345}, forger, mesh_key),
        "stale": signed(forger, mesh_key, issued_at=time.time() - 3600),
    }
