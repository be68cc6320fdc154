"""PeerChannels: one long-lived gRPC channel per peer address, and the mesh token every call carries."""

from __future__ import annotations

import grpc

from dataplane import rpc


class PeerChannels:
    """One long-lived channel per peer address (HTTP/2 multiplexes all calls to it)."""

    def __init__(self, token: str) -> None:
        self._token = token
        self._channels: dict[str, grpc.aio.Channel] = {}

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
