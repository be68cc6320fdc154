"""Fetching a peer's signed advert over HTTP (`GET /mesh/advert`), with a timeout and a size cap.

A node on a LAN answers `GET /mesh/advert` only to members: the request carries `ADVERT_TOKEN_HEADER`,
a token derived from the mesh secret for this purpose alone. HTTP is plaintext, so a LAN sniffer can
read it, as it can read the adverts that travel by multicast; that is why it is not the gRPC token: a
sniffed advert token fetches adverts and nothing else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp

from discovery.envelope import MAX_ENVELOPE_BYTES, derive_subkey

FETCH_TIMEOUT_S = 2.0
ADVERT_TOKEN_HEADER = "X-Meshllm-Mesh"


def advert_token(mesh_key: bytes) -> str:
    """What a member sends with `GET /mesh/advert`; 64 hex characters."""
    return derive_subkey(mesh_key, "advert-fetch").hex()

# (host, port_http, port_grpc) -> the raw signed envelope; raises FetchError (or OSError/timeout)
FetchAdvert = Callable[[str, int, int], Awaitable[bytes]]


class FetchError(Exception):
    pass


class AdvertTooLarge(FetchError):
    """The peer served more than MAX_ENVELOPE_BYTES: hostile or broken, counted as `oversized`."""


class HttpAdvertFetcher:
    """One pooled aiohttp session for all peers; call close() when discovery stops."""

    def __init__(self, timeout_s: float = FETCH_TIMEOUT_S, token: str = "") -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._headers = {ADVERT_TOKEN_HEADER: token} if token else {}
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, host: str, port_http: int, port_grpc: int) -> bytes:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        url = f"http://{_host_for_url(host)}:{port_http}/mesh/advert"
        try:
            async with self._session.get(url, allow_redirects=False, headers=self._headers) as resp:  # no redirects: only that address
                if resp.status != 200:
                    raise FetchError(f"{url}: HTTP {resp.status}")
                data = await _read_capped(resp.content, MAX_ENVELOPE_BYTES)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise FetchError(f"{url}: {e!r}") from None
        if len(data) > MAX_ENVELOPE_BYTES:
            raise AdvertTooLarge(f"{url}: body over {MAX_ENVELOPE_BYTES} bytes")
        return data

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read_capped(stream: aiohttp.StreamReader, cap: int) -> bytes:
    """The body up to one byte past cap: an oversized body is refused without reading it all.

    StreamReader.read(n) returns what is buffered (maybe one TCP segment), so loop to EOF or the cap.
    """
    buf = bytearray()
    while len(buf) <= cap:
        chunk = await stream.read(cap + 1 - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host
