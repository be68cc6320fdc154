"""Advert round trip, and every forged or malformed envelope refused with the right reason."""

from __future__ import annotations

import dataclasses
import json

import msgpack
import pytest
from disc_builders import make_advert

from discovery import envelope
from discovery.advert import AdvertError, NodeAdvert
from discovery.envelope import (
    MAX_ENVELOPE_BYTES,
    decode_signed,
    encode_signed,
    mesh_key_from_secret,
)
from discovery.identity import Identity

KEY = mesh_key_from_secret("test-mesh")
ME = Identity.generate()


def test_round_trip_wire_and_json() -> None:
    advert = make_advert(ME, seq=42)
    assert decode_signed(encode_signed(advert, ME, KEY), KEY) == advert
    as_json = json.loads(json.dumps(advert.to_dict()))
    assert NodeAdvert.from_dict(as_json) == advert
    assert as_json["models"][0]["whole"] is True
    assert len(encode_signed(advert, ME, KEY)) < 1024  # small enough to refresh often


def _env(payload: bytes, identity: Identity = ME, key: bytes = KEY, sig: bytes | None = None) -> bytes:
    sig = identity.sign(envelope._SIGN_DOMAIN + payload) if sig is None else sig
    return msgpack.packb([1, payload, sig, envelope._mac(key, payload)])


def _payload(**changes: object) -> bytes:
    d = make_advert(ME).to_dict()
    d.update(changes)
    return msgpack.packb(d)


OTHER = Identity.generate()
GOOD = encode_signed(make_advert(ME), ME, KEY)
FORGED = {
    "garbage": (b"\x00\xffnot msgpack at all", "malformed"),
    "empty": (b"", "malformed"),
    "truncated": (GOOD[:-5], "malformed"),
    "trailing bytes": (GOOD + b"\x00", "malformed"),
    "oversized": (b"\x90" * (MAX_ENVELOPE_BYTES + 1), "oversized"),
    "not an array": (msgpack.packb({"a": 1}), "malformed"),
    "wrong version": (msgpack.packb([3, b"", b"s" * 64, b"m" * 32]), "bad_version"),
    "ext type": (msgpack.packb([1, msgpack.ExtType(5, b"x"), b"", b""]), "malformed"),
    "other mesh": (encode_signed(make_advert(ME), ME, mesh_key_from_secret("other")), "other_mesh"),
    "bad signature": (_env(_payload(), sig=b"\x01" * 64), "bad_signature"),
    "signed by someone else": (_env(_payload(), identity=OTHER), "bad_signature"),
    "someone else's id with own key": (
        _env(_payload(node_id=OTHER.node_id)),
        "id_mismatch",
    ),
    "someone else's id and key, own signature": (
        _env(_payload(node_id=OTHER.node_id, public_key=OTHER.public_key_raw.hex())),
        "bad_signature",
    ),
    "seq as string": (_env(_payload(seq="1")), "bad_type"),
    "seq as bool": (_env(_payload(seq=True)), "bad_type"),
    "negative seq": (_env(_payload(seq=-1)), "bad_value"),
    "nan ttl": (_env(_payload(ttl_s=float("nan"))), "bad_value"),
    "models not a list": (_env(_payload(models={"x": 1})), "bad_type"),
    "too many models": (_env(_payload(models=[{}] * 65)), "oversized"),
    "bad layer range": (
        _env(_payload(models=[dict(make_advert(ME).to_dict()["models"][0], start=5, end=3)])),
        "bad_value",
    ),
    "name too long": (_env(_payload(name="x" * 1000)), "oversized"),
    "missing addresses": (_env(_payload(addresses=None)), "bad_type"),
    "payload not a map": (_env(msgpack.packb([1, 2, 3])), "bad_type"),
    "int map key": (_env(msgpack.packb({1: 2})), "malformed"),
}


@pytest.mark.parametrize(("data", "reason"), FORGED.values(), ids=FORGED.keys())
def test_forged_rejected_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(AdvertError) as err:
        decode_signed(data, KEY)
    assert err.value.reason == reason


def test_encode_refuses_foreign_advert_and_empty_secret() -> None:
    with pytest.raises(ValueError):
        encode_signed(make_advert(OTHER), ME, KEY)
    with pytest.raises(ValueError):
        mesh_key_from_secret("")


def test_encode_refuses_oversized() -> None:
    model = dataclasses.replace(make_advert(ME).models[0], alias="a" * 64, engine="e" * 64)
    too_many = dataclasses.replace(make_advert(ME), models=(model,) * 65)
    with pytest.raises(AdvertError):
        encode_signed(too_many, ME, KEY)
    too_big = dataclasses.replace(make_advert(ME), models=(model,) * 64)
    with pytest.raises(ValueError, match="cap"):
        encode_signed(too_big, ME, KEY)
