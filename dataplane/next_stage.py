"""The call from one pipeline stage to the next: resolved in our own PeerTable, watched for silence.

The next stage is named by node id; its address is what its advert says (`PeerChannels.channel_to`),
so a request cannot point a stage at an address of its choosing, and a node that is no member we know
is refused. The call opens with the first activation (so the header and the tensor travel together),
every read waits at most `Silence.deadline_s()` (the next stage heartbeats while it works), and what
fails leaves as `Unavailable` naming the node id and the status code only, never the connect error's
text (issue 11, findings 6 and 10). A failure further down the chain that the next stage reports
("next stage <id> <why>") is passed on as it is, so the driver learns which stage failed and
re-routes around that one (issue 14, `routing/failover.py`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import grpc
import torch

from core.errors import Busy, Unavailable
from dataplane import rpc
from dataplane.channels import PeerChannels
from dataplane.liveness import Silence, is_heartbeat
from dataplane.stage_wire import Header
from dataplane.status import from_rpc_error
from shard.activation_wire import encode_activation

log = logging.getLogger(__name__)
# what a next stage's own NextStage says when a stage behind it failed (ASCII, bounded)
DOWNSTREAM = re.compile(r"(?:UNAVAILABLE: )?(next stage [0-9a-f]{8} [ -~]{1,160})")


class NextStage:
    def __init__(self, channels: PeerChannels, header: Header) -> None:
        self._channels = channels
        self._header = header  # what the next stage gets: its hop first
        self.node = header.chain[0].node
        self._call: grpc.aio.StreamStreamCall | None = None
        self._silence = Silence()

    def _failed(self, why: str) -> Unavailable:
        return Unavailable(f"next stage {self.node[:8]} {why}", code="pipeline_failed")

    async def _open(self) -> grpc.aio.StreamStreamCall:
        channel = await self._channels.connect(self.node)
        if channel is None:
            raise self._failed("is not a member this node knows")
        call = channel.stream_stream(
            rpc.method_path("Forward"), request_serializer=rpc.identity, response_deserializer=rpc.identity
        )(metadata=self._channels.metadata)
        self._call = call
        await self._write(rpc.pack({"h": self._header.encode()}))
        return call

    async def _write(self, frame: bytes) -> None:
        assert self._call is not None
        try:
            async with asyncio.timeout(self._silence.deadline_s()):
                await self._call.write(frame)
        except TimeoutError:
            raise self._failed("stopped reading") from None
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from None

    def _error(self, e: grpc.aio.AioRpcError) -> Exception:
        error = from_rpc_error(e)
        if isinstance(error, Busy):
            return error  # the next stage's queue is full: the client retries later
        if isinstance(error, Unavailable) and (m := DOWNSTREAM.fullmatch(error.message)):
            return Unavailable(m.group(1), code="pipeline_failed")  # a stage further on failed: say which
        log.info("next stage %s failed: %s %s", self.node[:8], e.code().name, e.details())
        return self._failed(f"failed ({e.code().name})")

    async def ask(self, x: torch.Tensor, pos: int, group: int | None = None) -> dict[str, Any]:
        """Sends one step's activation, returns the next stage's reply (heartbeats skipped). `group`:
        the size of the decode batch that made x (stage_wire.decode_group), None for a prompt."""
        call = self._call or await self._open()
        for frame in encode_activation(x, pos):
            await self._write(rpc.pack({"a": frame} if group is None else {"a": frame, "b": group}))
        self._silence.start()  # the wait for this step's answer starts now
        while True:
            deadline_s = self._silence.deadline_s()
            try:
                async with asyncio.timeout(deadline_s):  # not wait_for: it can swallow a cancel on 3.11
                    raw = await call.read()
            except TimeoutError:
                raise self._failed(f"went silent for {deadline_s:.1f} s") from None
            except grpc.aio.AioRpcError as e:
                raise self._error(e) from None
            if raw is grpc.aio.EOF:
                raise self._failed("closed the stream")
            self._silence.heard()
            try:
                obj = rpc.unpack_map(raw)
            except rpc.PayloadError:
                raise self._failed("sent a malformed reply") from None
            if not is_heartbeat(obj):
                return obj

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
