"""The test process as a member of a real mesh: its own node identity and data-plane certificate, a
signed advert multicast on loopback every second (so nodes list it and accept its certificate), and
gRPC channels to nodes pinned to the certificates their adverts carry. A unique module name: tests/
has no __init__.py."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from typing import Any

import grpc

from dataplane import rpc
from dataplane.tls import MeshTls
from discovery.advert import Addresses, Load, NodeAdvert, Resources
from discovery.envelope import decode_signed, derive_subkey, encode_signed, mesh_key_from_secret
from discovery.fetch import ADVERT_TOKEN_HEADER, advert_token
from discovery.identity import Identity
from discovery.lan_multicast import GROUP, PORT


def node_endpoint(url: str, mesh_key: bytes) -> tuple[str, str, str]:
    """(node id, gRPC address, certificate PEM) from a node's own signed advert at GET /mesh/advert."""
    request = urllib.request.Request(url + "/mesh/advert", headers={ADVERT_TOKEN_HEADER: advert_token(mesh_key)})
    with urllib.request.urlopen(request, timeout=10) as resp:
        advert = decode_signed(resp.read(), mesh_key)
    return advert.node_id, advert.addresses.grpc, advert.tls_cert


class Member:
    def __init__(self, secret: str, *, advertise: bool = True, ttl_s: float = 10.0) -> None:
        """`ttl_s`: how long nodes keep the member after its last advert (one a second): a test that waits
        for it to expire asks for less."""
        self.ttl_s = ttl_s
        self.identity = Identity.generate()
        self.node_id = self.identity.node_id
        self.mesh_key = mesh_key_from_secret(secret)
        self.token = derive_subkey(self.mesh_key, "grpc-token").hex()
        self.metadata = ((rpc.AUTH_KEY, self.token),)
        self.tls = MeshTls(self.node_id, list)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._advertise, daemon=True) if advertise else None
        if self._thread is not None:
            self._thread.start()

    def advert(self) -> NodeAdvert:
        now = time.time()
        return NodeAdvert(
            node_id=self.node_id, name="test-member", version="0.1.0", public_key=self.identity.public_key_raw,
            addresses=Addresses(http="127.0.0.1:1", grpc="", libp2p=()), models=(),
            resources=Resources("cpu", 0, 0, 8 << 30, 4 << 30, 0.0), load=Load(0, 0, 0),
            seq=int(now * 1000), issued_at=now, ttl_s=self.ttl_s, tls_cert=self.tls.cert_pem,
        )

    def _advertise(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        sock.bind(("127.0.0.1", 0))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        with sock:
            while not self._stop.is_set():
                sock.sendto(encode_signed(self.advert(), self.identity, self.mesh_key), (GROUP, PORT))
                self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def channel_credentials(self, server_cert: str) -> grpc.ChannelCredentials:
        return self.tls.channel_credentials(server_cert)

    def options(self, server_node_id: str) -> list[tuple[str, Any]]:
        return [*rpc.CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", server_node_id)]

    def aio_channel(self, node_id: str, address: str, cert: str) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(address, self.channel_credentials(cert), options=self.options(node_id))

    def channel(self, node_id: str, address: str, cert: str) -> grpc.Channel:
        return grpc.secure_channel(address, self.channel_credentials(cert), options=self.options(node_id))
