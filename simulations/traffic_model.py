"""What a discovery message costs on the wire, from measurement (scripts/bench_discovery.py).

The simulator counts the real bytes the production Publisher hands its transports (signed adverts
and heartbeats, as encoded), plus what the transport adds around them. The additions were fitted to
real libp2p-only meshes on loopback (`bench_discovery.py --rest-only --modes libp2p`, counting every
IPv4 packet): at rest, 4 nodes sent 689 B/s each and 8 nodes 1,281 B/s (2026-12, 2-core box).
* Per message on a libp2p direct stream: TCP/IP header (52 B with timestamps), the receiver's ACK
  (52 B), Noise length and tag (18 B), yamux frame header (12 B): 134 B. With it, the Publisher's
  schedule (a 149 B beat every 2.5 s, the ~1.2 KB advert every 30 s, per connected peer) predicts
  154 B/s per connection per node; the measured slope between 4 and 8 nodes is 148 B/s.
* Per node, whatever its connections: 245 B/s (the intercept at 4 and 8 nodes: the host's own
  upkeep, DHT and gossipsub heartbeats), charged to every libp2p node.
* Per multicast datagram: IPv4 + UDP headers, 28 B.
* A DHT lookup or put (model records): ceil(log2 n) request/response hops of ~DHT_HOP_BYTES each,
  plus the value; a put stores the value on DHT_REPLICAS nodes.
"""

from __future__ import annotations

import math

LIBP2P_MSG_OVERHEAD_BYTES = 134
LIBP2P_NODE_BACKGROUND_BYTES_S = 245.0
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
