"""A fresh mTLS channel to a peer that refuses us at first (it restarted and has not heard of us yet):
`PeerChannels.connect` redials until the peer knows our certificate, so the first call succeeds.
Real gRPC servers and handshakes on loopback. The channels wait WINDOW_S, not FRESH_CONNECT_S (5 s):
the same wait, and the test of its end takes 2 s instead of 5 s."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from dataplane import rpc
from dataplane.channels import Endpoint, PeerChannels
from dataplane.tls import MeshTls

WINDOW_S = 2.0  # PeerChannels(fresh_connect_s=...)
SERVER_ID = "aaaaaaaa" + "0" * 24
CLIENT_ID = "bbbbbbbb" + "0" * 24


async def _serve(known: list[str]) -> tuple[grpc.aio.Server, MeshTls, int]:
    tls = MeshTls(SERVER_ID, lambda: list(known))

    async def echo(request: bytes, context) -> bytes:
        return request

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        rpc.SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)})])
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials())
    await server.start()
    return server, tls, port


async def _call(channel: grpc.aio.Channel) -> bytes:
    call = channel.unary_unary(rpc.method_path("Echo"), request_serializer=rpc.identity,
                               response_deserializer=rpc.identity)
    return await call(b"hi", timeout=5)


@pytest.mark.parametrize("learns_after_s", [0.0, 0.8, 1.5])  # at once, soon, late in the window
def test_a_peer_that_learns_us_late_still_takes_the_first_call(learns_after_s):
    async def main() -> float:
        known: list[str] = []
        server, server_tls, port = await _serve(known)
        client_tls = MeshTls(CLIENT_ID, lambda: [])
        channels = PeerChannels("t", lambda n: Endpoint(f"127.0.0.1:{port}", server_tls.cert_pem), tls=client_tls,
                                fresh_connect_s=WINDOW_S)
        loop = asyncio.get_running_loop()
        loop.call_later(learns_after_s, known.append, client_tls.cert_pem)
        try:
            started = time.monotonic()
            channel = await channels.connect(SERVER_ID)
            assert channel is not None
            assert await _call(channel) == b"hi"
            return time.monotonic() - started
        finally:
            await channels.close()
            await server.stop(0)

    took_s = asyncio.run(main())
    assert took_s < learns_after_s + 1.0, f"the first call took {took_s:.2f} s"


def test_a_peer_that_never_learns_us_fails_after_the_window():
    async def main() -> float:
        server, server_tls, port = await _serve([])
        channels = PeerChannels("t", lambda n: Endpoint(f"127.0.0.1:{port}", server_tls.cert_pem),
                                tls=MeshTls(CLIENT_ID, lambda: []), fresh_connect_s=WINDOW_S)
        try:
            started = time.monotonic()
            channel = await channels.connect(SERVER_ID)
            assert channel is not None
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _call(channel)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            return time.monotonic() - started
        finally:
            await channels.close()
            await server.stop(0)

    took_s = asyncio.run(main())
    assert WINDOW_S - 0.3 < took_s < WINDOW_S + 1.5
