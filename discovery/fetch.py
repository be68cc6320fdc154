"""Fetching a peer's signed advert over HTTP (`GET /mesh/advert`), with a timeout and a size cap."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp

from discovery.envelope import MAX_ENVELOPE_BYTES

FETCH_TIMEOUT_S = 2.0

# (host, port_http, port_grpc) -> the raw signed envelope; raises FetchError (or OSError/timeout)
FetchAdvert = Callable[[str, int, int], Awaitable[bytes]]


class FetchError(Exception):
    pass


class HttpAdvertFetcher:
    """One pooled aiohttp session for all peers; call close() when discovery stops."""

    def __init__(self, timeout_s: float = FETCH_TIMEOUT_S) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, host: str, port_http: int, port_grpc: int) -> bytes:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        url = f"http://{_host_for_url(host)}:{port_http}/mesh/advert"
        try:
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    raise FetchError(f"{url}: HTTP {resp.status}")
                # read one byte past the cap, so an oversized body is refused without reading it all
                data = await resp.content.read(MAX_ENVELOPE_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise FetchError(f"{url}: {e!r}") from None
        if len(data) > MAX_ENVELOPE_BYTES:
            raise FetchError(f"{url}: body over {MAX_ENVELOPE_BYTES} bytes")
        return data

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host
