"""FetchManifest / FetchTensors at the boundary: an in-process server, hostile and normal requests."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from conftest import model_file

from dataplane import rpc
from dataplane.channels import Endpoint, PeerChannels
from dataplane.weights import MAX_PIECES_PER_CALL, Served, WeightsService
from dataplane.weights_client import GrpcSource, fetch_manifest
from shard.fetch import SourceBusy
from shard.manifest import ManifestError, build_manifest, range_pieces

TOKEN = "t" * 32
SMOL = model_file("smollm2-135m-instruct")
MANIFEST = build_manifest(SMOL.path, SMOL.digest, SMOL.alias)
HELD = {p.index for p in range_pieces(MANIFEST, 10, 20, 30)}


def _read(piece):
    with open(SMOL.path, "rb") as f:
        f.seek(piece.offset)
        return f.read(piece.length)


async def _with_server(body, streams: int = 4):
    served = Served(MANIFEST, MANIFEST.encode(), HELD.__contains__, _read, tuple(MANIFEST.all_pieces()))
    service = WeightsService(lambda d: served if d == SMOL.digest else None, TOKEN, streams)
    server = rpc.build_server(service.handlers())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channels = PeerChannels(TOKEN, directory=lambda n: Endpoint(f"127.0.0.1:{port}", ""))
    try:
        return await body(channels, port, service)
    finally:
        await channels.close()
        await server.stop(0)


async def _call(port: int, method: str, payload: object, token: str = TOKEN) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_stream(rpc.method_path(method), request_serializer=rpc.identity, response_deserializer=rpc.identity)(
            rpc.pack(payload), metadata=((rpc.AUTH_KEY, token),))
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as e:
            return e.code()
        return grpc.StatusCode.OK


first_held = min(HELD)


@pytest.mark.parametrize(("method", "payload", "token", "code"), [
    ("FetchTensors", {"model": "0" * 64, "pieces": [[0, 1]]}, TOKEN, grpc.StatusCode.NOT_FOUND),
    ("FetchManifest", {"model": "0" * 64}, TOKEN, grpc.StatusCode.NOT_FOUND),
    ("FetchTensors", {"model": "../../etc/passwd", "pieces": [[0, 1]]}, TOKEN, grpc.StatusCode.INVALID_ARGUMENT),
    ("FetchTensors", {"model": SMOL.digest, "pieces": [[max(HELD) + 1, 1]]}, TOKEN, grpc.StatusCode.INVALID_ARGUMENT),
    ("FetchTensors", {"model": SMOL.digest, "pieces": [[first_held, MAX_PIECES_PER_CALL + 1]]}, TOKEN,
     grpc.StatusCode.INVALID_ARGUMENT),
    ("FetchTensors", {"model": SMOL.digest, "pieces": [[-1, 1]]}, TOKEN, grpc.StatusCode.INVALID_ARGUMENT),
    ("FetchTensors", {"model": SMOL.digest, "pieces": "all"}, TOKEN, grpc.StatusCode.INVALID_ARGUMENT),
    ("FetchTensors", {"model": SMOL.digest, "pieces": [[first_held, 1]]}, "wrong", grpc.StatusCode.UNAUTHENTICATED),
    ("FetchTensors", {"model": SMOL.digest, "pieces": [[first_held, 2]]}, TOKEN, grpc.StatusCode.OK),
])
def test_requests_at_the_boundary(method, payload, token, code):
    async def body(channels, port, service):
        return await _call(port, method, payload, token)

    assert asyncio.run(_with_server(body)) == code


def test_a_source_streams_verified_pieces_and_the_manifest_checks_its_id():
    async def body(channels, port, service):
        manifest = await fetch_manifest(channels, "n", SMOL.digest, MANIFEST.manifest_id)
        with pytest.raises(ManifestError):
            await fetch_manifest(channels, "n", SMOL.digest, "f" * 64)
        source = GrpcSource(channels, "n", SMOL.digest, HELD.__contains__, 4)
        pieces = [p for p in MANIFEST.all_pieces() if p.index in HELD][:5]
        got = [(i, d) async for i, d in source.fetch(pieces)]
        assert [i for i, _ in got] == [p.index for p in pieces]
        assert all(manifest.check_piece(i, d) for i, d in got)
        return service.stats.bytes_served

    assert asyncio.run(_with_server(body)) > 0


def test_the_serve_cap_answers_busy():
    async def body(channels, port, service):
        source = GrpcSource(channels, "n", SMOL.digest, HELD.__contains__, 1)
        pieces = [p for p in MANIFEST.all_pieces() if p.index in HELD][:8]
        first = source.fetch(pieces)
        await anext(first)  # one stream open: the cap of 1 is taken
        with pytest.raises(SourceBusy):
            async for _ in source.fetch(pieces[:1]):
                pass
        await first.aclose()

    asyncio.run(_with_server(body, streams=1))
