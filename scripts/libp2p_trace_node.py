"""`meshllm node join` with py-libp2p's sent bytes counted by protocol (a diagnostic for the bench).

    python scripts/libp2p_trace_node.py TRACE.json node join ...

Wraps `NetStream.write` (a stream's payload, by its negotiated protocol: gossipsub, the DHT, identify,
ping, our beats), `SecureSession.write` (everything a connection sends inside Noise: payloads plus
yamux frames, window updates, yamux pings and multistream negotiation) and counts new outbound
streams by protocol. Once a second it writes the running totals to TRACE.json, so a caller can take the
difference over any window. The counts are of bytes handed down, before Noise framing and TCP/IP:
the wire capture is the total; these say whose it is.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DUMP_EVERY_S = 1.0


def install(path: Path) -> None:
    from libp2p.network.stream.net_stream import NetStream
    from libp2p.security.secure_session import SecureSession

    sent: Counter[str] = Counter()
    writes: Counter[str] = Counter()
    opened: Counter[str] = Counter()
    stream_write = NetStream.write
    session_write = SecureSession.write

    async def counted_stream_write(self: NetStream, data: bytes) -> None:
        proto = str(self.get_protocol() or "(negotiating)")
        sent[proto] += len(data)
        writes[proto] += 1
        if proto.startswith("/meshsub/"):
            for part, size in gossip_parts(data).items():
                sent[f"  meshsub {part}"] += size
                writes[f"  meshsub {part}"] += 1
        await stream_write(self, data)

    async def counted_session_write(self: SecureSession, data: bytes) -> None:
        sent["(inside noise: all)"] += len(data)
        writes["(inside noise: all)"] += 1
        await session_write(self, data)

    NetStream.write = counted_stream_write  # type: ignore[method-assign]
    SecureSession.write = counted_session_write  # type: ignore[method-assign]

    from libp2p.host.basic_host import BasicHost

    new_stream = BasicHost.new_stream

    async def counted_new_stream(self: BasicHost, peer_id: object, protocol_ids: object) -> object:
        stream = await new_stream(self, peer_id, protocol_ids)  # type: ignore[arg-type]
        opened[str(stream.get_protocol())] += 1
        return stream

    BasicHost.new_stream = counted_new_stream  # type: ignore[method-assign]

    import dataclasses

    import discovery.publisher as publisher
    from discovery.changes import significant_change

    publish_kind = publisher.publish_kind

    def counted_publish_kind(old: object, new: object, **kw: object) -> str:
        """Why our node sends what it sends: each publish's kind, and for a new advert ("change") why."""
        kind = publish_kind(old, new, **kw)  # type: ignore[arg-type]
        if kind == "change":
            if kw["forced"]:
                why = "publish_soon"
            elif old is None:
                why = "first"
            else:
                same_free = dataclasses.replace(new, resources=old.resources, load=old.load)  # type: ignore[attr-defined]
                why = "content" if significant_change(old, same_free) else "free memory"  # type: ignore[arg-type]
            kind = f"change ({why})"
        writes[f"publish: {kind}"] += 1
        return kind.split(" (")[0]

    publisher.publish_kind = counted_publish_kind  # type: ignore[assignment]

    def dump() -> None:
        while True:
            time.sleep(DUMP_EVERY_S)
            snap = {"t": time.monotonic(), "bytes": dict(sent), "writes": dict(writes), "opened": dict(opened)}
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(snap))
            os.replace(tmp, path)

    threading.Thread(target=dump, daemon=True, name="libp2p-trace-dump").start()


def gossip_parts(data: bytes) -> dict[str, int]:
    """A gossipsub write (varint length + RPC protobuf) split into its parts' encoded sizes."""
    from libp2p.pubsub.pb import rpc_pb2

    n, shift, i = 0, 0, 0
    while i < len(data):  # the varint length prefix
        b = data[i]
        n |= (b & 0x7F) << shift
        shift += 7
        i += 1
        if not b & 0x80:
            break
    rpc = rpc_pb2.RPC()
    try:
        rpc.ParseFromString(data[i:i + n])
    except Exception:  # a partial write: count it as unknown
        return {"unparsed": len(data)}
    parts: dict[str, int] = {}
    if rpc.publish:
        parts["publish"] = sum(m.ByteSize() for m in rpc.publish)
    if rpc.subscriptions:
        parts["subscriptions"] = sum(m.ByteSize() for m in rpc.subscriptions)
    if rpc.HasField("senderRecord"):  # a signed peer record, sent with every RPC by py-libp2p 0.8.1
        parts["senderRecord"] = len(rpc.senderRecord)
    if rpc.HasField("control"):
        c = rpc.control
        for name in ("ihave", "iwant", "graft", "prune", "idontwant"):
            items = getattr(c, name)
            if len(items):
                parts[f"control.{name}"] = sum(m.ByteSize() for m in items)
    return parts


def main() -> None:
    path = Path(sys.argv[1])
    install(path)
    sys.argv = ["meshllm", *sys.argv[2:]]
    from node.cli import main as cli_main

    raise SystemExit(cli_main())


if __name__ == "__main__":
    main()
