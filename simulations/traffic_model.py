"""What a discovery message costs on the wire, from measurement (scripts/bench_discovery.py).

The simulator counts the real bytes the production Publisher hands its transports (signed adverts
and heartbeats, as encoded), plus what the transport adds around them, fitted to real libp2p-only
meshes on loopback (`bench_discovery.py --rest-only --modes libp2p --trace`: every IPv4 packet
counted, and py-libp2p's bytes by protocol inside each node, scripts/libp2p_trace_node.py):
* Per message on a libp2p direct stream: 290 B. py-libp2p 0.8.1 writes the yamux frame (12 B header)
  in one Noise frame (18 B), and the receiver's yamux answers every read with a window update (its own
  Noise frame); with the TCP ACKs that is ~4.2 IPv4 packets of 52 B headers per message. Measured per
  message: 288 B at 4 nodes, 325 at 8, 284-299 at 16 (2026-11-29, 2-core box).
* Per node, whatever its connections: 0 B/s. The 245 B/s fitted before (the intercept of 4 and 8 nodes)
  was gossipsub floods of full adverts set off by peers met at rest (now sent directly); at rest with
  no flood the trace shows no DHT, identify or ping traffic and gossipsub's heartbeats ~25 B/s.
* Per multicast datagram: IPv4 + UDP headers, 28 B.
* A DHT lookup or put (model records): ceil(log2 n) request/response hops of ~DHT_HOP_BYTES each,
  plus the value; a put stores the value on DHT_REPLICAS nodes.
Not modelled: a starved box. With 16 processes on 2 busy cores, nodes late by a ttl expire peers and
meet them again, beat streams are reset and reopened (each with a full-advert introduction): the real
mesh then sends 2-4x the model (benchmarks.md).
"""

from __future__ import annotations

import math

LIBP2P_MSG_OVERHEAD_BYTES = 290
LIBP2P_NODE_BACKGROUND_BYTES_S = 0.0
UDP_OVERHEAD_BYTES = 28
DHT_HOP_BYTES = 2 * (LIBP2P_MSG_OVERHEAD_BYTES + 100)  # a FIND_NODE request and its answer
DHT_REPLICAS = 3
GOSSIP_DEGREE = 3  # discovery/libp2p_host.py GOSSIP_DEGREE: each node forwards a message to D peers


def libp2p_bytes(payload: int) -> int:
    return payload + LIBP2P_MSG_OVERHEAD_BYTES


def multicast_bytes(payload: int) -> int:
    return payload + UDP_OVERHEAD_BYTES


def dht_hops(n_nodes: int) -> int:
    return max(1, math.ceil(math.log2(max(2, n_nodes))))
