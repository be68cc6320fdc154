"""Heartbeat: a small signed "I am alive, my current advert is seq S" (~160 bytes instead of ~650).

At rest a node sends its full signed advert only when its content changes (and rarely otherwise) and a
beat every period. A beat is sealed in the same envelope as an advert (version 2, its own MAC and
signature domains), so it is mesh-bound and signed; it carries no public key: the receiver checks it
against the key of the advert it already holds for that node, and a beat for a node it does not know
cannot be verified and is ignored.

A beat may carry the sender's load (active, queued, capacity) when it differs from the load in its
current advert: load changes with every request, and rides on beats instead of new full adverts
(discovery/publisher.py). The receiver applies it to the stored advert (PeerTable.touch). A node of an
earlier version refuses a 4-item beat as malformed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import msgpack

from discovery.advert import AdvertError, Load, NodeAdvert
from discovery.envelope import (
    BEAT_VERSION,
    ENVELOPE_VERSION,
    advert_from_payload,
    open_envelope,
    seal_envelope,
    unpack_payload,
    verify_envelope,
)
from discovery.identity import Identity

MAX_BEAT_BYTES = 512  # a genuine beat is about 160 bytes
_NODE_ID = re.compile(r"[0-9a-f]{32}")
_MAX_INT = 2**63 - 1
MAX_LOAD_COUNT = 2**31 - 1  # requests active/queued/capacity: larger counts are malformed


@dataclass(frozen=True, slots=True)
class Beat:
    node_id: str
    seq: int  # seq of the sender's current advert
    issued_at: float  # sender's clock; strictly increasing per sender (replay guard, PeerTable.touch)
    payload: bytes
    signature: bytes
    load: Load | None = None  # the sender's load now, when it differs from its advert's

    def verify(self, public_key: bytes) -> bool:
        return verify_envelope(BEAT_VERSION, public_key, self.payload, self.signature)


def encode_beat(identity: Identity, mesh_key: bytes, seq: int, issued_at: float, load: Load | None = None) -> bytes:
    fields: list[object] = [identity.node_id, seq, float(issued_at)]
    if load is not None:
        fields.append([load.active, load.queued, load.capacity])
    payload = msgpack.packb(fields, use_bin_type=True)
    return seal_envelope(BEAT_VERSION, payload, identity, mesh_key)


def decode_message(data: object, mesh_key: bytes) -> NodeAdvert | Beat:
    """One boundary for every envelope: a fully checked advert, or a beat whose signature the caller
    checks against the stored key (Beat.verify). Raises AdvertError with a reject reason."""
    version, payload, signature = open_envelope(data, mesh_key)
    if version == ENVELOPE_VERSION:
        return advert_from_payload(payload, signature)
    size = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else 0  # open_envelope checked it
    if size > MAX_BEAT_BYTES:
        raise AdvertError("oversized", f"beat of {size} bytes")
    fields = unpack_payload(payload)
    if not isinstance(fields, list) or len(fields) not in (3, 4):
        raise AdvertError("malformed", "beat must be a 3- or 4-item array")
    node_id, seq, issued_at = fields[:3]
    if not isinstance(node_id, str) or not _NODE_ID.fullmatch(node_id):
        raise AdvertError("bad_type", "beat node_id")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= _MAX_INT:
        raise AdvertError("bad_type", "beat seq")
    if isinstance(issued_at, bool) or not isinstance(issued_at, (int, float)):
        raise AdvertError("bad_type", "beat issued_at")
    if not math.isfinite(issued_at) or issued_at < 0:
        raise AdvertError("bad_value", "beat issued_at")
    load = _load(fields[3]) if len(fields) == 4 else None
    return Beat(node_id, seq, float(issued_at), payload, signature, load)


def _load(value: object) -> Load:
    if not isinstance(value, list) or len(value) != 3:
        raise AdvertError("malformed", "beat load must be a 3-item array")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_LOAD_COUNT:
            raise AdvertError("bad_type", "beat load counts")
    return Load(*value)
