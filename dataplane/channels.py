"""PeerChannels: one long-lived gRPC channel per peer address, the mesh token every call carries, and
the directory that turns a node id into the address its advert names.

Addresses come only from the directory (the PeerTable's verified adverts, installed by the router),
never from a request: a stage told to forward to node X connects to X's advertised address or
refuses (issue 11, finding 6).
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from dataplane import rpc

Directory = Callable[[str], str | None]  # node id -> advertised gRPC address, None when not a member


def _nobody(node_id: str) -> str | None:
    return None


class PeerChannels:
    """One long-lived channel per peer address (HTTP/2 multiplexes all calls to it)."""

    def __init__(self, token: str, directory: Directory | None = None) -> None:
        self._token = token
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._directory: Directory = directory or _nobody
        self.has_directory = directory is not None

    def set_directory(self, directory: Directory) -> None:
        self._directory = directory
        self.has_directory = True

    def address_of(self, node_id: str) -> str | None:
        """The gRPC address `node_id` advertises, or None when it is no member we know."""
        address = self._directory(node_id)
        return address or None

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=rpc.CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((rpc.AUTH_KEY, self._token),)

    async def forget(self, address: str) -> None:
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
