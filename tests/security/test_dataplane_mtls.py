"""mTLS on the data plane (issue 11), against a real node process: only a current member, holding the
certificate its signed advert carries, gets through the TLS handshake, and only with the mesh token;
a client pins the server to the certificate in that node's advert, so a server with another key (or
an advert naming another key) is refused."""

from __future__ import annotations

import asyncio
import secrets
import sys
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mesh"))
from discovery_mesh_helpers import get_json, peer_ids, wait_for  # noqa: E402
from mesh_member import Member, node_endpoint  # noqa: E402

from core.errors import Unavailable  # noqa: E402
from dataplane import rpc  # noqa: E402
from dataplane.calls import remote_load_shard  # noqa: E402
from dataplane.channels import Endpoint, PeerChannels  # noqa: E402
from discovery.envelope import decode_signed  # noqa: E402
from discovery.tls_cert import cert_matches, make_tls_cert  # noqa: E402

SECRET = "mtls-" + secrets.token_hex(6)


def _get_advert(channel: grpc.Channel, metadata: tuple = ()) -> bytes | grpc.StatusCode:
    try:
        return channel.unary_unary(rpc.method_path("GetAdvert"))(b"", metadata=metadata, timeout=5)
    except grpc.RpcError as e:
        return e.code()


def test_only_members_with_their_advertised_certificate_reach_the_data_plane(node_factory) -> None:
    node = node_factory("A", "--no-model", "--mesh-secret", SECRET)
    # a 4 s ttl (adverts every 1 s) instead of 10 s: the wait for its advert to expire below is 6 s shorter
    member = Member(SECRET, ttl_s=4.0)
    try:
        wait_for(lambda: member.node_id in peer_ids(node.url), 15, "the node lists the test member")
        node_id, address, cert = node_endpoint(node.url, member.mesh_key)
        assert cert_matches(cert, node_id), "the node's advert carries its certificate"

        # a member with its advertised certificate and the token: served
        with member.channel(node_id, address, cert) as ch:
            assert decode_signed(_get_advert(ch, member.metadata), member.mesh_key).node_id == node_id  # type: ignore[arg-type]
            # the token stays a second factor: a member's certificate alone is not enough
            assert _get_advert(ch) == grpc.StatusCode.UNAUTHENTICATED

        # a plaintext client with the right token: refused in the handshake
        with grpc.insecure_channel(address) as ch:
            assert _get_advert(ch, member.metadata) == grpc.StatusCode.UNAVAILABLE
        # TLS with a stranger's self-signed certificate (never advertised), the right token: refused
        stranger = Member(SECRET, advertise=False)
        with stranger.channel(node_id, address, cert) as ch:
            assert _get_advert(ch, member.metadata) == grpc.StatusCode.UNAVAILABLE
        # TLS without any client certificate: refused
        anonymous = grpc.ssl_channel_credentials(root_certificates=cert.encode())
        with grpc.secure_channel(address, anonymous, options=member.options(node_id)) as ch:
            assert _get_advert(ch, member.metadata) == grpc.StatusCode.UNAVAILABLE

        # the client side: an advert for this node id whose certificate is another key is refused,
        # through the very channels the nodes use; the true advert works
        _key, impostor_cert = make_tls_cert(node_id)
        assert _call_through_peer_channels(member, node_id, Endpoint(address, impostor_cert)) == "refused"
        assert _call_through_peer_channels(member, node_id, Endpoint(address, cert)) == "ok"
        # pinned to the right certificate but expecting another node id at that address: refused
        with member.channel("f" * 32, address, cert) as ch:
            assert _get_advert(ch, member.metadata) == grpc.StatusCode.UNAVAILABLE

        # once the member's advert expires, it is no member: a new connection is refused in the
        # handshake, and a connection it opened while it was one is refused call by call
        live = member.channel(node_id, address, cert)
        assert isinstance(_get_advert(live, member.metadata), bytes)
        member.stop()
        wait_for(lambda: member.node_id not in peer_ids(node.url), 20, "the member's advert expires")
        with member.channel(node_id, address, cert) as ch:
            assert _get_advert(ch, member.metadata) == grpc.StatusCode.UNAVAILABLE
        assert _get_advert(live, member.metadata) == grpc.StatusCode.UNAUTHENTICATED
        live.close()
        assert get_json(node.url + "/health") == {"status": "ok"}
    finally:
        member.stop()


def _call_through_peer_channels(member: Member, node_id: str, endpoint: Endpoint) -> str:
    """LoadShard of an unknown model through PeerChannels: "ok" when the node answered (it refuses the
    load itself), "refused" when the TLS handshake failed."""

    async def main() -> str:
        channels = PeerChannels(member.token, lambda nid: endpoint if nid == node_id else None, tls=member.tls)
        try:
            await remote_load_shard(channels, node_id, "0" * 64, 0, 1)
        except Unavailable:
            return "refused"
        except Exception:  # noqa: BLE001 - any answer of the node's own (not found, bad request)
            return "ok"
        finally:
            await channels.close()
        return "ok"

    return asyncio.run(main())
