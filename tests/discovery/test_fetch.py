"""The default HTTP advert fetcher: size cap, status check, timeout, and a module import check."""

from __future__ import annotations

import asyncio
import importlib
import pkgutil

import pytest
from aiohttp import web

import discovery
from discovery.envelope import MAX_ENVELOPE_BYTES
from discovery.fetch import AdvertTooLarge, FetchError, HttpAdvertFetcher


async def _serve(handler: object) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_get("/mesh/advert", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


@pytest.mark.parametrize(
    ("body", "status", "expect_error"),
    [(b"x" * 100, 200, False), (b"x" * (MAX_ENVELOPE_BYTES + 1), 200, True), (b"", 503, True)],
)
def test_fetch_caps_and_status(body: bytes, status: int, expect_error: bool) -> None:
    async def main() -> None:
        async def handler(_request: web.Request) -> web.Response:
            return web.Response(body=body, status=status)

        runner, port = await _serve(handler)
        fetch = HttpAdvertFetcher(timeout_s=2.0)
        try:
            if expect_error:
                with pytest.raises(FetchError):
                    await fetch("127.0.0.1", port, 0)
            else:
                assert await fetch("127.0.0.1", port, 0) == body
        finally:
            await fetch.close()
            await runner.cleanup()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("size", "too_large"), [(MAX_ENVELOPE_BYTES - 10, False), (MAX_ENVELOPE_BYTES + 1, True), (200_000, True)]
)
def test_fetch_reads_a_body_sent_in_pieces_whole_up_to_the_cap(size: int, too_large: bool) -> None:
    # StreamReader.read(n) returns one buffered piece: a body sent in small writes must not be cut short
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)

    async def main() -> None:
        async def pieces(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse()
            await resp.prepare(request)
            for i in range(0, len(body), 1000):
                await resp.write(body[i : i + 1000])
                await asyncio.sleep(0)
            await resp.write_eof()
            return resp

        runner, port = await _serve(pieces)
        fetch = HttpAdvertFetcher(timeout_s=5.0)
        try:
            if too_large:
                with pytest.raises(AdvertTooLarge):
                    await fetch("127.0.0.1", port, 0)
            else:
                assert await fetch("127.0.0.1", port, 0) == body
        finally:
            await fetch.close()
            await runner.cleanup()

    asyncio.run(main())


def test_fetch_times_out_and_refused() -> None:
    async def main() -> None:
        async def slow(_request: web.Request) -> web.Response:
            await asyncio.sleep(1.0)
            return web.Response(body=b"late")

        runner, port = await _serve(slow)
        fetch = HttpAdvertFetcher(timeout_s=0.3)
        try:
            with pytest.raises(FetchError):
                await fetch("127.0.0.1", port, 0)
        finally:
            await runner.cleanup()
        with pytest.raises(FetchError):
            await fetch("127.0.0.1", port, 0)  # nothing listens there any more
        await fetch.close()

    asyncio.run(main())


def test_every_module_imports_and_lazy_exports() -> None:
    for info in pkgutil.iter_modules(discovery.__path__):
        importlib.import_module(f"discovery.{info.name}")
    assert discovery.Discovery.__name__ == "Discovery"
