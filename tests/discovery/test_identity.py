from __future__ import annotations

import stat

from discovery.identity import Identity, node_id_from_public_key, verify_signature


def test_identity_persists_and_node_id_comes_from_the_key(tmp_path):
    first = Identity.load_or_create(tmp_path)
    again = Identity.load_or_create(tmp_path)
    assert first.node_id == again.node_id == node_id_from_public_key(first.public_key_raw)
    assert stat.S_IMODE((tmp_path / "node_key.pem").stat().st_mode) == 0o600
    assert Identity.generate().node_id != first.node_id


def test_signatures_verify_only_for_the_signer_and_data():
    a, b = Identity.generate(), Identity.generate()
    sig = a.sign(b"advert")
    assert verify_signature(a.public_key_raw, sig, b"advert")
    assert not verify_signature(b.public_key_raw, sig, b"advert")
    assert not verify_signature(a.public_key_raw, sig, b"advert2")
    assert not verify_signature(b"short", sig, b"advert")
