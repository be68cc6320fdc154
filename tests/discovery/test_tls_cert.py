"""The data-plane certificate in adverts: made per node id, carried in the signed advert, and refused
(`bad_cert`, `oversized`, `bad_type`) when it is not one P-256 certificate naming the advert's node id."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from disc_builders import make_advert

from discovery import envelope
from discovery.advert import AdvertError
from discovery.envelope import decode_signed, encode_signed, mesh_key_from_secret
from discovery.identity import Identity
from discovery.tls_cert import MAX_CERT_CHARS, cert_matches, make_tls_cert

KEY = mesh_key_from_secret("test-mesh")
ME = Identity.generate()


def test_certificate_names_the_node_and_rides_in_the_signed_advert() -> None:
    _key, cert = make_tls_cert(ME.node_id)
    assert cert_matches(cert, ME.node_id) and not cert_matches(cert, Identity.generate().node_id)
    assert len(cert) < MAX_CERT_CHARS
    advert = dataclasses.replace(make_advert(ME), tls_cert=cert)
    data = encode_signed(advert, ME, KEY)
    assert decode_signed(data, KEY).tls_cert == cert
    assert len(data) < 2048


def _signed_with(cert: object) -> bytes:
    d = make_advert(ME).to_dict()
    d["tls_cert"] = cert
    payload = msgpack.packb(d)
    sig = ME.sign(envelope._SIGN_DOMAIN + payload)
    return msgpack.packb([1, payload, sig, envelope._mac(KEY, payload)])


_, OTHERS_CERT = make_tls_cert(Identity.generate().node_id)
_, MINE = make_tls_cert(ME.node_id)


@pytest.mark.parametrize(("cert", "reason"), [
    (OTHERS_CERT, "bad_cert"),  # another node's certificate
    ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "bad_cert"),
    (MINE + MINE, "oversized"),  # two certificates (a client would trust both): too long anyway
    (MINE[:400] + "\n-----BEGIN CERTIFICATE-----\n", "bad_cert"),  # a second one begun
    ("x" * (MAX_CERT_CHARS + 1), "oversized"),
    (b"\x30\x82", "bad_type"),
])
def test_bad_certificates_are_refused(cert: object, reason: str) -> None:
    with pytest.raises(AdvertError) as e:
        decode_signed(_signed_with(cert), KEY)
    assert e.value.reason == reason


def test_an_advert_without_a_certificate_is_still_read() -> None:
    d = make_advert(ME).to_dict()
    del d["tls_cert"]
    payload = msgpack.packb(d)
    data = msgpack.packb([1, payload, ME.sign(envelope._SIGN_DOMAIN + payload), envelope._mac(KEY, payload)])
    assert decode_signed(data, KEY).tls_cert == ""
