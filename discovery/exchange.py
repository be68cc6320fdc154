"""AntiEntropy: the anti-entropy exchange's state and I/O glue (the decisions are anti_entropy.py's).

Keeps the signed envelope of every advert the table accepted (to relay it unchanged), sends one
digest per EXCHANGE_EVERY_S to one connected peer, answers digests (one per asking peer per half
period, MAX_ANSWERS_PER_ROUND in all) and takes answers only from a peer it asked, once, at most
MAX_ANSWER_ADVERTS adverts, each through Discovery.receive (source "relay").
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Collection
from typing import Protocol

from discovery.advert import NodeAdvert
from discovery.anti_entropy import (
    ANSWER_WINDOW_S,
    DIGEST_KIND,
    EXCHANGE_EVERY_S,
    MAX_SEQ,
    Digest,
    ExchangeError,
    Version,
    build_digest,
    choose_partner,
    content_tag,
    decode_answer,
    decode_digest,
    encode_answer,
    encode_digest,
    to_send,
)
from discovery.peer_table import PeerTable

MAX_ANSWERS_PER_ROUND = 8  # digests answered per EXCHANGE_EVERY_S, whoever asks
MAX_PENDING = 64  # peers asked (or answered) remembered at once


class DirectSender(Protocol):
    @property
    def connected_peers(self) -> Collection[str]: ...

    def send_to(self, peer_id: str, data: bytes) -> None: ...


class AntiEntropy:
    def __init__(
        self,
        table: PeerTable,
        clock: Callable[[], float],
        receive: Callable[[bytes], bool],
        reject: Callable[[str, str], None],
    ) -> None:
        self._table = table
        self._clock = clock
        self._receive = receive  # Discovery.receive(data, "relay")
        self._reject = reject  # (reason, detail), counted by Discovery's RejectCounter
        self.host: DirectSender | None = None  # set while libp2p runs (not in records mode)
        # node id -> (seq, tag, envelope) of adverts the table accepted; capped like the table
        self._held: OrderedDict[str, tuple[int, int, bytes]] = OrderedDict()
        self._asked: dict[str, float] = {}  # peer id -> when we sent it our digest
        self._answered: dict[str, float] = {}  # peer id -> when we last answered its digest
        self._round, self._answers_in_round = -1, 0
        self.digests_sent = self.answers_sent = self.relayed = 0

    def note(self, advert: NodeAdvert, envelope: bytes) -> None:
        """The table accepted `advert` (NEW or UPDATED) from these bytes: keep them to relay."""
        self._held[advert.node_id] = (advert.seq, content_tag(advert), envelope)
        self._held.move_to_end(advert.node_id)
        while len(self._held) > 2 * self._table.max_peers:  # live and departed nodes
            self._held.popitem(last=False)

    def versions(self, now: float) -> list[Version]:
        """What our digest says: live peers and those that left or expired (with their last seq)."""
        out = [Version(p.advert.node_id, p.advert.seq, self._tag(p.advert.node_id, p.advert.seq))
               for p in self._table.snapshot(now)]
        out += [Version(nid, seq, self._tag(nid, seq)) for nid, seq in self._table.departed_seqs()]
        # ourselves at the highest seq: no peer ever has a newer advert of ours to send back (without
        # it every answer carried our own advert, as the one id our digest lacked)
        out.append(Version(self._table.self_id, MAX_SEQ, 0))
        return out

    def ask(self) -> None:
        """One round: our digest to one connected peer (choose_partner)."""
        if self.host is None:
            return
        now = self._clock()
        partner = choose_partner(self._table.self_id, list(self.host.connected_peers), now)
        if partner is None:
            return
        digest = build_digest(self._table.self_id, self.versions(now), now)
        self._remember(self._asked, partner, now)
        self.digests_sent += 1
        self.host.send_to(partner, encode_digest(digest))

    def on_frame(self, data: bytes, peer_id: str) -> None:
        """A digest or answer from peer_id over its direct stream (hostile until validated)."""
        now = self._clock()
        try:
            if data[1] == DIGEST_KIND:
                self._answer(decode_digest(data), peer_id, now)
            else:
                self._take(decode_answer(data), peer_id, now)
        except ExchangeError as e:
            self._reject("malformed", f"exchange from {peer_id}: {e}")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(EXCHANGE_EVERY_S)
            self.ask()

    # --- internals ----------------------------------------------------------------------------------

    def _tag(self, node_id: str, seq: int) -> int:
        held = self._held.get(node_id)
        return held[1] if held is not None and held[0] == seq else 0

    def _answer(self, digest: Digest, peer_id: str, now: float) -> None:
        rnd = int(now // EXCHANGE_EVERY_S)
        if rnd != self._round:
            self._round, self._answers_in_round = rnd, 0
        last = self._answered.get(peer_id)
        if self.host is None or self._answers_in_round >= MAX_ANSWERS_PER_ROUND or (
            last is not None and now - last < EXCHANGE_EVERY_S / 2
        ):
            return  # rate-limited: an honest peer asks once per period, spread over its peers
        relayable = []
        for p in self._table.snapshot(now):
            held = self._held.get(p.advert.node_id)
            if held is not None and held[0] == p.advert.seq:
                relayable.append(Version(p.advert.node_id, held[0], held[1]))
        ids = to_send(digest, relayable)
        self._remember(self._answered, peer_id, now)
        self._answers_in_round += 1
        answer = encode_answer([self._held[nid][2] for nid in ids])
        if answer is not None:
            self.answers_sent += 1
            self.host.send_to(peer_id, answer)

    def _take(self, envelopes: list[bytes], peer_id: str, now: float) -> None:
        asked = self._asked.pop(peer_id, None)
        if asked is None or now - asked > ANSWER_WINDOW_S:
            self._reject("unsolicited", f"exchange answer from {peer_id}")
            return
        for env in envelopes:  # decode_answer capped them at MAX_ANSWER_ADVERTS
            if self._receive(env):
                self.relayed += 1

    @staticmethod
    def _remember(book: dict[str, float], peer_id: str, now: float) -> None:
        book[peer_id] = now
        if len(book) > MAX_PENDING:
            for pid in sorted(book, key=book.__getitem__)[: len(book) - MAX_PENDING]:
                del book[pid]
