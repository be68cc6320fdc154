"""The signed advert envelope: msgpack [version, payload, ed25519 signature, mesh HMAC].

The signature proves which node spoke (node id = hash of the key inside the payload); the HMAC, keyed
by a key derived from the mesh secret, proves the sender belongs to this mesh. Checks run cheapest
first, so a flood of junk or of other meshes' adverts costs a length check and one HMAC each.
"""

from __future__ import annotations

import hashlib
import hmac

import msgpack
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from discovery.advert import AdvertError, NodeAdvert, advert_from_dict, advert_to_dict
from discovery.identity import Identity, node_id_from_public_key, verify_signature

ENVELOPE_VERSION = 1
MAX_ENVELOPE_BYTES = 16 * 1024

BEAT_VERSION = 2
# a signature or MAC for one kind of message can never be replayed as another kind
_SIGN_DOMAINS = {ENVELOPE_VERSION: b"meshllm/advert/sig/v1\x00", BEAT_VERSION: b"meshllm/beat/sig/v1\x00"}
_MAC_DOMAINS = {ENVELOPE_VERSION: b"meshllm/advert/mac/v1\x00", BEAT_VERSION: b"meshllm/beat/mac/v1\x00"}
_SIGN_DOMAIN = _SIGN_DOMAINS[ENVELOPE_VERSION]
_SIG_BYTES = 64
_MAC_BYTES = 32

# Everything msgpack (or a hostile structure) can raise while decoding: caught by name, never bare.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    OverflowError,
    msgpack.UnpackException,
)

_UNPACK_LIMITS = dict(
    raw=False,
    strict_map_key=True,
    use_list=True,
    max_str_len=MAX_ENVELOPE_BYTES,
    max_bin_len=MAX_ENVELOPE_BYTES,
    max_array_len=256,
    max_map_len=64,
    max_ext_len=0,  # no ext types (timestamps, custom) on this wire
)


def mesh_key_from_secret(secret: str) -> bytes:
    """32-byte mesh key; every per-purpose key is derived from it with a label."""
    if not secret:
        raise ValueError("mesh secret must not be empty")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"meshllm mesh v1", info=b"mesh key")
    return hkdf.derive(secret.encode("utf-8"))


def derive_subkey(mesh_key: bytes, label: str) -> bytes:
    """A 32-byte key for one purpose (e.g. "libp2p-pnet"), independent of the advert MAC key."""
    return hmac.new(mesh_key, b"meshllm/subkey/" + label.encode("utf-8"), hashlib.sha256).digest()


def _mac(mesh_key: bytes, payload: bytes, version: int = 1) -> bytes:
    return hmac.new(mesh_key, _MAC_DOMAINS[version] + payload, hashlib.sha256).digest()


def encode_signed(advert: NodeAdvert, identity: Identity, mesh_key: bytes) -> bytes:
    if advert.node_id != identity.node_id or advert.public_key != identity.public_key_raw:
        raise ValueError("advert node_id/public_key do not belong to this identity")
    fields = advert_to_dict(advert)
    advert_from_dict(fields)  # refuse to send what every receiver would refuse (raises AdvertError)
    data = seal_envelope(ENVELOPE_VERSION, msgpack.packb(fields, use_bin_type=True), identity, mesh_key)
    if len(data) > MAX_ENVELOPE_BYTES:
        raise ValueError(f"advert envelope is {len(data)} bytes, over the {MAX_ENVELOPE_BYTES} cap")
    return data


def open_envelope(data: object, mesh_key: bytes) -> tuple[int, bytes, bytes]:
    """Checks size, shape and the mesh HMAC of any envelope; returns (version, payload, signature).

    Version 1 carries an advert, version 2 a heartbeat (discovery/beat.py); each has its own MAC and
    signature domain, so one can never pass for the other.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise AdvertError("bad_type", "envelope must be bytes")
    if len(data) > MAX_ENVELOPE_BYTES:
        raise AdvertError("oversized", f"{len(data)} bytes")
    try:
        env = msgpack.unpackb(data, **_UNPACK_LIMITS)
    except DECODE_ERRORS as e:
        raise AdvertError("malformed", type(e).__name__) from None
    if not isinstance(env, list) or len(env) != 4:
        raise AdvertError("malformed", "envelope must be a 4-item array")
    version, payload, signature, mac = env
    if type(version) is not int or version not in _MAC_DOMAINS:  # a list or map would not even hash
        raise AdvertError("bad_version", repr(version)[:20])
    if not (isinstance(payload, bytes) and isinstance(signature, bytes) and isinstance(mac, bytes)):
        raise AdvertError("bad_type", "payload, signature and mac must be bytes")
    if len(signature) != _SIG_BYTES or len(mac) != _MAC_BYTES:
        raise AdvertError("bad_type", "signature or mac has the wrong length")
    if not hmac.compare_digest(mac, _mac(mesh_key, payload, version)):
        raise AdvertError("other_mesh")
    return version, payload, signature


def seal_envelope(version: int, payload: bytes, identity: Identity, mesh_key: bytes) -> bytes:
    signature = identity.sign(_SIGN_DOMAINS[version] + payload)
    return msgpack.packb([version, payload, signature, _mac(mesh_key, payload, version)], use_bin_type=True)


def verify_envelope(version: int, public_key: bytes, payload: bytes, signature: bytes) -> bool:
    return verify_signature(public_key, signature, _SIGN_DOMAINS[version] + payload)


def unpack_payload(payload: bytes) -> object:
    try:
        return msgpack.unpackb(payload, **_UNPACK_LIMITS)
    except DECODE_ERRORS as e:
        raise AdvertError("malformed", type(e).__name__) from None


def decode_signed(data: bytes, mesh_key: bytes) -> NodeAdvert:
    """Validates an advert envelope from a peer; raises AdvertError with a short reason code."""
    version, payload, signature = open_envelope(data, mesh_key)
    if version != ENVELOPE_VERSION:
        raise AdvertError("bad_version", repr(version)[:20])
    return advert_from_payload(payload, signature)


def advert_from_payload(payload: bytes, signature: bytes) -> NodeAdvert:
    advert = advert_from_dict(unpack_payload(payload))
    if node_id_from_public_key(advert.public_key) != advert.node_id:
        raise AdvertError("id_mismatch", advert.node_id)
    if not verify_envelope(ENVELOPE_VERSION, advert.public_key, payload, signature):
        raise AdvertError("bad_signature", advert.node_id)
    return advert
