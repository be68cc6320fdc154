"""Direct heartbeat streams (`/meshllm/beat/1`): one long-lived stream per connected peer, our side
to theirs, carrying length-prefixed envelopes that are never relayed.

Runs entirely in the libp2p host's trio thread; received frames leave through `deliver`, which
hands them to the asyncio side.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from discovery.anti_entropy import is_exchange

log = logging.getLogger(__name__)

BEAT_PROTOCOL = TProtocol("/meshllm/beat/1")  # one long-lived stream per connected peer, our side to theirs
INTRODUCE_EVERY_S = 0.5  # how often a new connection is looked for, to send it our full advert
DIRECT_WRITE_TIMEOUT_S = 2.0
MAX_FRAME_BYTES = 16 * 1024  # = MAX_ENVELOPE_BYTES: a direct frame is one envelope

# (envelope, is our full advert, peer ids to skip, the one peer id to send it to or "" for all)
Direct = tuple[bytes, bool, frozenset[str], str]


class DirectBeats:
    """Outbound streams to every connected peer (at most `max_peers`) and inbound ones served (at
    most `max_inbound`; more are reset). Trio thread only."""

    def __init__(
        self,
        deliver: Callable[[bytes], None],
        exchange: Callable[[bytes, str], None],
        *,
        max_peers: int,
        max_inbound: int,
        open_timeout_s: float,
    ) -> None:
        self._deliver = deliver
        self._exchange = exchange  # anti-entropy digests and answers, with the sender's peer id
        # peer ids we hold an outbound stream to (swapped whole, read from the asyncio thread)
        self.streams_to: frozenset[str] = frozenset()
        self._max_peers = max_peers
        self._max_inbound = max_inbound
        self._open_timeout_s = open_timeout_s
        self._inbound_streams = 0

    async def send_loop(self, host: object, envelopes: trio.MemoryReceiveChannel[Direct]) -> None:
        """Writes each envelope to every connected peer; introduces us (full advert) to new connections."""
        network = host.get_network()  # type: ignore[attr-defined]
        streams: dict[ID, object] = {}
        advert = b""
        while True:
            data: bytes | None = None
            skip: frozenset[str] = frozenset()
            only = ""
            with trio.move_on_after(INTRODUCE_EVERY_S):
                data, full, skip, only = await envelopes.receive()
                if full:
                    advert = data
            for pid in [p for p in streams if p not in network.connections]:
                streams.pop(pid, None)
            for pid in list(network.connections):
                if pid not in streams:
                    if not advert or len(streams) >= self._max_peers:
                        continue
                    stream = await self._open(host, pid)
                    if stream is None or not await self._write_frame(stream, advert):
                        continue
                    streams[pid] = stream
                    if data == advert:
                        continue  # the introduction was this very envelope
                if data is None or (skip and pid.to_base58() in skip) or (only and pid.to_base58() != only):
                    continue
                if not await self._write_frame(streams[pid], data):
                    streams.pop(pid, None)  # reopened (with an introduction) on the next round
            self.streams_to = frozenset(p.to_base58() for p in streams)

    async def serve(self, stream: object) -> None:
        """Inbound direct stream: length-prefixed envelopes, each handed to `deliver`."""
        if self._inbound_streams >= self._max_inbound:
            await stream.reset()  # type: ignore[attr-defined]
            return
        peer = stream.muxed_conn.peer_id.to_base58()  # type: ignore[attr-defined]  # Noise-authenticated
        self._inbound_streams += 1
        buf = bytearray()
        try:
            # One read per arriving chunk, frames cut from a buffer: py-libp2p 0.8.1's yamux sends a
            # window update after every read, so reading the length and then the body cost two per
            # beat (each a Noise frame, a TCP segment and its ACK on the wire)
            while True:
                while len(buf) >= 2:
                    size = int.from_bytes(buf[:2], "big")
                    if size == 0 or size > MAX_FRAME_BYTES:
                        return  # not our framing: drop the stream, the envelope check would refuse it anyway
                    if len(buf) < 2 + size:
                        break
                    frame = bytes(buf[2:2 + size])
                    if is_exchange(frame):  # the exchange needs to know who asked or answered
                        self._exchange(frame, peer)
                    else:
                        self._deliver(frame)
                    del buf[:2 + size]
                chunk = await stream.read(2 + MAX_FRAME_BYTES - len(buf))  # type: ignore[attr-defined]
                if not chunk:
                    raise EOFError("direct stream closed")
                buf += chunk  # never past one whole frame: each read asks only for the room left
        except Exception as e:  # EOF, reset, a peer going away: all end this stream only
            log.debug("direct stream ended: %r", e)
        finally:
            self._inbound_streams -= 1
            with trio.move_on_after(1):
                try:
                    await stream.reset()  # type: ignore[attr-defined]
                except Exception:
                    pass

    async def _open(self, host: object, pid: ID) -> object | None:
        with trio.move_on_after(self._open_timeout_s):
            try:
                return await host.new_stream(pid, [BEAT_PROTOCOL])  # type: ignore[attr-defined]
            except Exception as e:  # an old peer without the protocol, or a connection going away
                log.debug("direct stream to %s failed: %r", pid, e)
        return None

    @staticmethod
    async def _write_frame(stream: object, data: bytes) -> bool:
        with trio.move_on_after(DIRECT_WRITE_TIMEOUT_S):
            try:
                await stream.write(len(data).to_bytes(2, "big") + data)  # type: ignore[attr-defined]
                return True
            except Exception as e:  # reset or closed by the peer: dropped, reopened later
                log.debug("direct write failed: %r", e)
        with trio.move_on_after(1):
            try:
                await stream.reset()  # type: ignore[attr-defined]
            except Exception:
                pass
        return False

