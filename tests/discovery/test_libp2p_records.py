"""Model-keyed records on the real KadDHT (three libp2p hosts on loopback, no mDNS, no gossip): a
reader finds a model's holder it was never told about, through the record, and forged records fail."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest
from disc_builders import make_advert, wait_until
from libp2p.records.utils import InvalidRecordType

from discovery.advert import Addresses, NodeAdvert
from discovery.beat import decode_message
from discovery.envelope import encode_signed, mesh_key_from_secret
from discovery.identity import Identity
from discovery.libp2p_host import Libp2pHost
from discovery.libp2p_keys import peer_id_of
from discovery.libp2p_records import AdvertRecordValidator, advert_record_key
from discovery.model_records import record_key

KEY = mesh_key_from_secret("records-mesh")
DIGEST = "cd" * 32


def _signed(ident: Identity, seq: int = 1, key: bytes = KEY) -> bytes:
    advert = make_advert(ident, seq=seq, issued_at=time.time())
    return encode_signed(advert, ident, key)


def test_validator_runs_the_advert_boundary() -> None:
    a, b = Identity.generate(), Identity.generate()
    v = AdvertRecordValidator(KEY)
    v.validate(advert_record_key(peer_id_of(a)), _signed(a))
    for key, value in [
        (advert_record_key(peer_id_of(b)), _signed(a)),  # a's advert under b's key
        (advert_record_key(peer_id_of(a)), _signed(a, key=mesh_key_from_secret("other"))),  # other mesh
        (advert_record_key(peer_id_of(a)), _signed(a)[:-1] + b"\x00"),  # tampered
        (advert_record_key(peer_id_of(a)), b"\x00" * 20_000),  # oversized
    ]:
        with pytest.raises(InvalidRecordType):
            v.validate(key, value)
    k = advert_record_key(peer_id_of(a))
    assert v.select(k, [_signed(a, 5), _signed(a, 9), b"junk"]) == 1


def test_a_reader_finds_a_holder_it_was_not_told_about() -> None:
    got: list[bytes] = []

    async def main() -> None:
        hub, holder_id, reader_id = Identity.generate(), Identity.generate(), Identity.generate()
        hub_host = Libp2pHost(hub, lambda _d: None, mesh_key=KEY)
        await hub_host.start()
        boot = hub_host.addrs
        holder = Libp2pHost(holder_id, lambda _d: None, bootstrap=boot, mesh_key=KEY)
        reader = Libp2pHost(reader_id, got.append, bootstrap=boot, mesh_key=KEY)
        await holder.start()
        await reader.start()
        try:
            await asyncio.sleep(2.5)  # both dialed the hub (bootstrap), neither the other
            advert = dataclasses.replace(make_advert(holder_id), addresses=Addresses("127.0.0.1:1", "127.0.0.1:2",
                                                                                     tuple(holder.addrs)))
            signed = encode_signed(dataclasses.replace(advert, issued_at=time.time(), seq=7), holder_id, KEY)
            holder.put_records(signed, [record_key(DIGEST)])
            await asyncio.sleep(2.0)
            reader.lookup(record_key(DIGEST))
            await wait_until(lambda: bool(got), 15.0)
            found = decode_message(got[0], KEY)
            assert isinstance(found, NodeAdvert) and found.node_id == holder_id.node_id and found.seq == 7
            reader.lookup(record_key("ef" * 32))  # a model no one holds: no one else's advert arrives
            await asyncio.sleep(2.0)
            assert {decode_message(d, KEY).node_id for d in got} == {holder_id.node_id}
        finally:
            for h in (reader, holder, hub_host):
                await h.stop()

    asyncio.run(main())
    assert not [t.name for t in threading.enumerate() if t.name.startswith("libp2p-")]


def test_discovery_in_records_mode_finds_the_holder_by_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three Discovery services, libp2p only in records mode: no gossip flood, so the reader learns of
    the holder only when it looks the model up (lookup_model), then tracks it by its beats. The peer
    sample is emptied (with 3 nodes a sample of 2 is everyone): only the bootstrap and lookups dial.
    The reader joins after the holder's put (a put dials the key's replicas, here every node)."""
    import discovery.libp2p_host

    monkeypatch.setattr(discovery.libp2p_host, "sample_peers", lambda candidates, self_id: [])
    from discovery.peer_table import PeerTable
    from discovery.service import Discovery

    def make(models: bool, bootstrap: list[str], ttl_s: float = 10.0) -> tuple[Identity, Discovery]:
        ident = Identity.generate()
        advert = make_advert(ident) if models else make_advert(ident, models=())
        return ident, Discovery(ident, KEY, lambda: advert, PeerTable(ident.node_id), mdns=False, multicast=False,
                                libp2p_port=0, bootstrap=bootstrap, records=True, ttl_s=ttl_s, refresh_s=ttl_s / 4)

    async def main() -> None:
        _, hub = make(False, [])
        await hub.start()
        # a 2 s ttl (beats every 0.5 s): the 4.5 s below outlasts two of them, so only beats keep it known
        holder_id, holder = make(True, hub.libp2p_addrs, ttl_s=2.0)
        await holder.start()
        await asyncio.sleep(3.0)  # the holder's records are in (a Kademlia put dials the replicas: all here)
        _, reader = make(False, hub.libp2p_addrs)  # holds nothing: puts nothing, dials only the hub
        await reader.start()
        try:
            await asyncio.sleep(3.0)
            assert reader.table.get(holder_id.node_id) is None  # not flooded, not dialed
            reader.lookup_model(make_advert(holder_id).models[0].digest)
            await wait_until(lambda: reader.table.get(holder_id.node_id) is not None, 15.0)
            await asyncio.sleep(4.5)  # beats keep it (ttl 2 s) once dialed
            assert reader.table.get(holder_id.node_id) is not None
        finally:
            for d in (reader, holder, hub):
                await d.stop()

    asyncio.run(main())
