"""Model-keyed records on the real KadDHT (discovery/model_records.py says what they are).

A holder *provides* one key per model it holds (`record_key(digest)`: Kademlia provider records are
per-holder entries under one key, exactly Petals' shape) and puts its signed advert envelope as a value
under `/meshllm/<peer id>`. A reader finds at most MAX_RESULTS providers of a model key, gets each
one's advert value and dials it. Values pass `AdvertRecordValidator` on every DHT node that stores or
returns them: the same `decode_message` boundary as any advert (size cap, mesh HMAC, signature,
id/key binding), bound to the key's peer id, newest seq selected. The reader's `Discovery.receive`
checks them again (freshness, replay) like any advert.
"""

from __future__ import annotations

from libp2p.crypto.ed25519 import Ed25519PublicKey
from libp2p.peer.id import ID
from libp2p.records.utils import InvalidRecordType
from libp2p.records.validator import Validator

from discovery.advert import AdvertError, NodeAdvert
from discovery.beat import decode_message
from discovery.envelope import MAX_ENVELOPE_BYTES

NAMESPACE = "meshllm"


def advert_record_key(peer_id: str) -> str:
    """The DHT key of a node's signed advert (its libp2p peer id, base58)."""
    return f"/{NAMESPACE}/{peer_id}"


def peer_id_of_key(public_key: bytes) -> str:
    return ID.from_pubkey(Ed25519PublicKey.from_bytes(public_key)).to_base58()


class AdvertRecordValidator(Validator):
    """Runs on the trio thread inside KadDHT: pure checks, no I/O."""

    def __init__(self, mesh_key: bytes) -> None:
        self._mesh_key = mesh_key

    def _advert(self, key: str, value: bytes) -> NodeAdvert:
        if len(value) > MAX_ENVELOPE_BYTES:
            raise InvalidRecordType("oversized advert record")
        try:
            advert = decode_message(value, self._mesh_key)
        except AdvertError as e:
            raise InvalidRecordType(f"advert record: {e.reason}") from None
        if not isinstance(advert, NodeAdvert):
            raise InvalidRecordType("a beat is no advert record")
        if key != advert_record_key(peer_id_of_key(advert.public_key)):
            raise InvalidRecordType("advert record under another node's key")
        return advert

    def validate(self, key: str, value: bytes) -> None:
        self._advert(key, value)

    def select(self, key: str, values: list[bytes]) -> int:
        """The newest seq among the valid values (the first one if none is valid)."""
        best, best_seq = 0, -1
        for i, value in enumerate(values):
            try:
                seq = self._advert(key, value).seq
            except InvalidRecordType:
                continue
            if seq > best_seq:
                best, best_seq = i, seq
        return best
