"""PeerChannels: one long-lived gRPC channel per peer, the mesh token every call carries, and the
directory that turns a node id into the address and certificate its signed advert names.

Addresses come only from the directory (the PeerTable's verified adverts, installed by the router),
never from a request: a stage told to forward to node X connects to X's advertised address or
refuses (issue 11, finding 6). With mTLS (the default), the channel pins X's advertised certificate
and checks the node id as the server name, so whoever answers at that address must hold X's key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import NamedTuple

import grpc

from dataplane import rpc
from dataplane.tls import MeshTls


class Endpoint(NamedTuple):
    address: str  # "host:port" from the node's advert
    cert: str  # the PEM certificate from the same advert ("" when it names none)


Directory = Callable[[str], Endpoint | None]  # node id -> its advertised endpoint, None when not a member
# A member we just learned of may not have our advert yet, and until then its server refuses our
# certificate: a new channel's first calls wait up to this long for a handshake to succeed before they
# go ahead. A node that restarted (same id, new certificate) learns us when we publish on seeing its new
# certificate (discovery/service.py), about 0.2 s later; heartbeats bring it within 2.5 s regardless.
FRESH_CONNECT_S = 5.0
# While a fresh channel waits, a refused handshake is retried on a new channel this often: gRPC's own
# reconnect backoff (0.25 s growing 1.6x) would leave most of the window unused after a few refusals.
REDIAL_S = 0.2


def _nobody(node_id: str) -> Endpoint | None:
    return None


class PeerChannels:
    """One long-lived channel per peer endpoint (HTTP/2 multiplexes all calls to it).

    `tls` None is the explicit `--insecure-data-plane` (plaintext, token only); otherwise every channel
    is mTLS and a peer whose advert carries no certificate is not called at all.
    """

    def __init__(self, token: str, directory: Directory | None = None, tls: MeshTls | None = None,
                 fresh_connect_s: float = FRESH_CONNECT_S) -> None:
        """`fresh_connect_s`: FRESH_CONNECT_S (tests of the wait itself pass a shorter one)."""
        self._token = token
        self._tls = tls
        self._fresh_connect_s = fresh_connect_s
        self._channels: dict[tuple[str, str, str], grpc.aio.Channel] = {}  # (node id, address, cert)
        self._closing: set[asyncio.Task] = set()
        self._fresh: dict[tuple[str, str, str], float] = {}  # new mTLS channels: key -> wait-until (monotonic)
        self._directory: Directory = directory or _nobody
        self.has_directory = directory is not None

    def set_directory(self, directory: Directory) -> None:
        self._directory = directory
        self.has_directory = True

    def channel_to(self, node_id: str) -> grpc.aio.Channel | None:
        """The channel to member `node_id` at its advertised address (pinned to its advertised
        certificate under mTLS), or None when it is no member we can call."""
        found = self._lookup(node_id)
        return found[1] if found is not None else None

    def _lookup(self, node_id: str) -> tuple[tuple[str, str, str], grpc.aio.Channel] | None:
        endpoint = self._directory(node_id)
        if endpoint is None or not endpoint.address:
            return None
        if self._tls is None:
            key = (node_id, endpoint.address, "")
        elif not endpoint.cert:
            return None
        else:
            key = (node_id, endpoint.address, endpoint.cert)
        channel = self._channels.get(key)
        if channel is None:
            self._retire(node_id)  # the node restarted (new certificate) or moved: its old channel goes
            channel = self._open(node_id, endpoint)
            self._channels[key] = channel
            if self._tls is not None:
                self._fresh[key] = time.monotonic() + self._fresh_connect_s
        return key, channel

    async def connect(self, node_id: str) -> grpc.aio.Channel | None:
        """`channel_to`, and on a new mTLS channel a wait (at most fresh_connect_s from its creation)
        until a handshake succeeds, redialling on a new channel every REDIAL_S while the peer refuses us
        (it has not heard of us yet); a call made after that wait fails as it would have."""
        found = self._lookup(node_id)
        if found is None:
            return None
        key, channel = found
        until = self._fresh.get(key)
        while until is not None and (left := until - time.monotonic()) > 0:
            state = channel.get_state(try_to_connect=True)
            if state == grpc.ChannelConnectivity.READY:
                break
            if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                await asyncio.sleep(min(left, REDIAL_S))
                channel = self._redial(key, channel)
                continue
            try:
                async with asyncio.timeout(min(left, REDIAL_S)):
                    await channel.wait_for_state_change(state)
            except TimeoutError:
                pass
        self._fresh.pop(key, None)
        return self._channels.get(key, channel)

    def _redial(self, key: tuple[str, str, str], refused: grpc.aio.Channel) -> grpc.aio.Channel:
        """A new channel in place of one whose handshake was refused (another caller may have done it)."""
        current = self._channels.get(key)
        if current is not refused:
            return current if current is not None else refused
        endpoint = Endpoint(key[1], key[2])
        channel = self._open(key[0], endpoint)
        self._channels[key] = channel
        self._close_later(refused)
        return channel

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _retire(self, node_id: str) -> None:
        for key in [k for k in self._channels if k[0] == node_id]:
            self._fresh.pop(key, None)
            self._close_later(self._channels.pop(key))

    def _open(self, node_id: str, endpoint: Endpoint) -> grpc.aio.Channel:
        if self._tls is None:
            return grpc.aio.insecure_channel(endpoint.address, options=rpc.CHANNEL_OPTIONS)
        options = [*rpc.CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", node_id)]
        return grpc.aio.secure_channel(endpoint.address, self._tls.channel_credentials(endpoint.cert), options=options)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((rpc.AUTH_KEY, self._token),)

    async def forget(self, node_id: str) -> None:
        for key in [k for k in self._channels if k[0] == node_id]:
            self._fresh.pop(key, None)
            await self._channels.pop(key).close()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._fresh.clear()
