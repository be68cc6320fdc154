"""A LAN stranger, run inside its own network namespace: it knows the mesh secret (the worst case),
advertises a model over mDNS and multicast, sends unicast and oversized datagrams at the victim, and
counts connections made to its gRPC port. Usage: python lan_stranger.py IP VICTIM_IP SECRET SECONDS."""

from __future__ import annotations

import asyncio
import socket
import sys
import time

from discovery.advert import Addresses, Load, ModelAdvert, NodeAdvert, Resources
from discovery.envelope import mesh_key_from_secret
from discovery.identity import Identity
from discovery.lan_multicast import GROUP, PORT
from discovery.peer_table import PeerTable
from discovery.service import Discovery

ALIAS = "smollm2-135m-instruct"


async def main(ip: str, victim_ip: str, secret: str, seconds: float) -> None:
    connections = 0

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    grpc = await asyncio.start_server(on_conn, ip, 0)
    http = await asyncio.start_server(on_conn, ip, 0)
    g_port, h_port = grpc.sockets[0].getsockname()[1], http.sockets[0].getsockname()[1]
    me = Identity.generate()
    advert = NodeAdvert(
        node_id=me.node_id, name="stranger", version="0.1.0", public_key=me.public_key_raw,
        addresses=Addresses(f"{ip}:{h_port}", f"{ip}:{g_port}", ()),
        models=(ModelAdvert("cd" * 32, ALIAS, n_layers=30, start=0, end=30, engine="llama.cpp", ctx=2048),),
        resources=Resources("cpu", 0, 0, 64 << 30, 60 << 30, 500.0), load=Load(0, 0, 64),
        seq=0, issued_at=0.0, ttl_s=0.0,
    )
    disc = Discovery(me, mesh_key_from_secret(secret), lambda: advert, PeerTable(me.node_id),
                     host_ip=ip, refresh_s=0.5, ttl_s=3.0)
    await disc.start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(ip))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        data = disc.signed_advert()
        for target in ((victim_ip, PORT), (GROUP, PORT), (victim_ip, 5353)):
            sock.sendto(data, target)
        sock.sendto(b"x" * 20000, (GROUP, PORT))
        await asyncio.sleep(0.3)
    await disc.stop()
    print(f"connections={connections}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
