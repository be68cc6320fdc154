"""Pipeline stages over gRPC: stage 0 drives the token loop, each stage pushes activations onward.

`PipelineGenerate` (unary-stream, at stage 0): a Generate request plus the chain
[[grpc address, start, end], ...]. Stage 0 tokenises, runs its layers and opens `Forward`
(stream-stream) to stage 1 with a header; every stage runs its layers on each activation and pushes
the result to the next stage. The last stage samples, turns the token into text (`TokenOutput`: EOS,
stop strings, max_tokens) and answers; the answer travels back along the open streams to stage 0,
which feeds the token into the next step and streams the chunk to the gateway.

A stage's session is admitted by its model's runner like a whole-model request (the same bounded
queue, the same `Busy` → 429) and counted in its load. Closing or cancelling any stream cancels the
others, and every stage frees the session's KV slot in `finally`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import grpc
import torch

from core.errors import BadRequest, Busy, MeshError, ModelNotFound, Unavailable
from core.types import Chunk, SamplingParams
from dataplane import rpc
from dataplane.channels import PeerChannels
from dataplane.service import authorise
from dataplane.stage_wire import Header, Hop, decode_chain, decode_header, decode_reply, encode_reply
from dataplane.status import abort, from_rpc_error
from dataplane.wire import decode_request, encode_chunk
from engine.local_models import LocalModel, LocalModels
from engine.token_output import TokenOutput
from engine.torch_engine import SessionError, SessionLimitError, TorchShardEngine
from engine.torch_generate import prompt_tokens
from engine.types import check_context
from shard.activation_wire import ActivationAssembler, ActivationError, encode_activation
from shard.spec import ShardSpec

log = logging.getLogger(__name__)
STEP_TIMEOUT_S = 60.0  # a neighbour silent this long has failed
_DECODE_ERRORS = (rpc.PayloadError, ActivationError)


class PipelineService:
    def __init__(self, local: LocalModels, channels: PeerChannels, token: str,
                 on_step: Callable[[str, int, float], None] | None = None) -> None:
        self._local = local
        self._channels = channels
        self._token = token
        self._on_step = on_step or (lambda digest, n_positions, compute_s: None)
        self.sessions_opened = 0

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {
            "PipelineGenerate": rpc.unary_stream(self.pipeline_generate),
            "Forward": rpc.stream_stream(self.forward),
        }

    # --- helpers ---------------------------------------------------------------------------------
    def _stage(self, digest: str, hop: Hop) -> tuple[LocalModel, TorchShardEngine]:
        local = self._local.resolve(digest)
        if local is not None and isinstance(local.runner.engine, TorchShardEngine):
            n_layers = local.model.n_layers
            if hop.end <= n_layers and hop.start < hop.end and local.shard == ShardSpec(digest, hop.start, hop.end, n_layers):
                return local, local.runner.engine
        raise ModelNotFound(digest, [], f"layers [{hop.start}, {hop.end}) of {digest[:12]} are not held here")

    def _open(self, engine: TorchShardEngine, sid: str, params: SamplingParams | None) -> None:
        try:
            engine.open_session(sid, params)
        except SessionLimitError as e:
            raise Busy(1, str(e)) from None
        except SessionError as e:
            raise BadRequest(str(e)) from None
        self.sessions_opened += 1

    async def _run(self, engine: TorchShardEngine, sid: str, x: torch.Tensor, pos: int) -> torch.Tensor:
        def timed() -> tuple[torch.Tensor, float]:
            started = time.perf_counter()
            result = engine.forward_stage([sid], [x], [pos])[0]
            return result, time.perf_counter() - started  # compute alone, without the thread hand-off

        try:
            if engine.n_sessions == 1 and x.shape[0] == 1:
                # The one place model compute runs on the event loop, on purpose: a lone session's
                # decode step has nothing to batch with, and running it inline saves two thread
                # hand-offs per token (per-hop overhead 0.88 -> 0.24 ms, docs/benchmarks.md). The loop
                # is busy for one step, as the engine would be.
                out, compute_s = timed()
            else:  # off the loop; concurrent sessions' steps are batched by the engine
                out, compute_s = await asyncio.to_thread(timed)
        except SessionError as e:
            raise BadRequest(str(e)) from None
        self._on_step(engine.model.digest, x.shape[0], compute_s)
        return out

    def _next_call(self, address: str) -> grpc.aio.StreamStreamCall:
        return self._channels.channel(address).stream_stream(
            rpc.method_path("Forward"), request_serializer=rpc.identity, response_deserializer=rpc.identity
        )(metadata=self._channels.metadata)

    async def _ask_next(self, call: grpc.aio.StreamStreamCall, x: torch.Tensor, pos: int) -> dict[str, Any]:
        for frame in encode_activation(x, pos):
            await call.write(rpc.pack({"a": frame}))
        try:
            async with asyncio.timeout(STEP_TIMEOUT_S):  # not wait_for: it can swallow a cancel on 3.11
                raw = await call.read()
        except TimeoutError:
            raise Unavailable("next stage timed out", code="pipeline_failed") from None
        except grpc.aio.AioRpcError as e:
            error = from_rpc_error(e)
            if isinstance(error, Busy):
                raise error from None  # the next stage's queue is full: the client retries later
            raise Unavailable(f"next stage failed: {e.code().name} {e.details()}", code="pipeline_failed") from None
        if raw is grpc.aio.EOF:
            raise Unavailable("next stage closed the stream", code="pipeline_failed")
        return rpc.unpack_map(raw)

    def _sample(self, engine: TorchShardEngine, sid: str, h: torch.Tensor, output: TokenOutput) -> tuple[Chunk, int]:
        """The last stage's half of the token loop: sample, then text, EOS, stop strings, max_tokens."""
        token = engine.sample([sid], h)[0]
        return output.push(token), token

    # --- stage 0 -------------------------------------------------------------------------------
    async def pipeline_generate(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        await authorise(context, self._token)
        try:
            obj = rpc.unpack_map(request)
            digest, generation = decode_request(obj)
            chain = decode_chain(obj.get("chain"))
            local, engine = self._stage(digest, chain[0])
            ids = await asyncio.to_thread(prompt_tokens, engine, generation)  # chat template + tokenizer
            max_new = check_context(engine.max_context, len(ids), generation.params.max_tokens, what="this pipeline's")
            async with local.runner.admit(), aclosing(
                self._drive(engine, digest, chain, ids, max_new, generation.params)
            ) as chunks:
                async for chunk in chunks:
                    yield rpc.pack(encode_chunk(chunk))
        except rpc.PayloadError as e:
            await abort(context, BadRequest(str(e)))
        except MeshError as e:
            await abort(context, e)

    async def _drive(self, engine: TorchShardEngine, digest: str, chain: list[Hop], ids: list[int], max_new: int,
                     params: SamplingParams) -> AsyncGenerator[Chunk, None]:
        sid = f"p-{uuid.uuid4().hex}"
        single = len(chain) == 1
        call = None
        try:
            self._open(engine, sid, params if single else None)
            output = TokenOutput(engine.tokenizer, params.stop, len(ids), max_new) if single else None
            if not single:
                call = self._next_call(chain[1].address)
                header = Header(sid, digest, chain[1:], params, len(ids), max_new)
                await call.write(rpc.pack({"h": header.encode()}))
            x, pos = torch.tensor(ids), 0
            while True:
                h = await self._run(engine, sid, x, pos)
                pos += x.shape[0]
                if output is not None:  # one stage holds it all: sample here
                    chunk, token = self._sample(engine, sid, h, output)
                else:
                    assert call is not None
                    chunk, token = decode_reply(await self._ask_next(call, h, pos - x.shape[0]))
                yield chunk
                if chunk.finish_reason is not None:
                    return
                x = torch.tensor([token])
        finally:
            engine.close_session(sid)
            if call is not None:
                call.cancel()

    # --- stages 1..n-1 -------------------------------------------------------------------------
    async def forward(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        await authorise(context, self._token)
        frames = requests.__aiter__()
        try:
            header = decode_header(await _next_map(frames))
            local, engine = self._stage(header.model, header.chain[0])
            async with local.runner.admit(), aclosing(self._relay(engine, header, frames)) as replies:
                async for reply in replies:
                    yield rpc.pack(reply)
        except TimeoutError:
            await abort(context, Unavailable("previous stage went silent", code="pipeline_failed"))
        except _DECODE_ERRORS as e:
            await abort(context, BadRequest(str(e)))
        except MeshError as e:
            await abort(context, e)

    async def _relay(self, engine: TorchShardEngine, header: Header, frames: AsyncIterator[bytes]) -> AsyncGenerator[dict[str, Any], None]:
        last = len(header.chain) == 1
        sid = header.sid
        call = None
        self._open(engine, sid, header.params if last else None)
        try:
            output = TokenOutput(engine.tokenizer, header.params.stop, header.prompt_len, header.max_new) if last else None
            if not last:
                call = self._next_call(header.chain[1].address)
                await call.write(rpc.pack({"h": header.onward().encode()}))
            assembler = ActivationAssembler()
            while True:
                try:
                    async with asyncio.timeout(STEP_TIMEOUT_S):
                        obj = await _next_map(frames)
                except StopAsyncIteration:
                    return  # the previous stage finished or hung up
                frame = obj.get("a")
                if not isinstance(frame, dict):
                    raise rpc.PayloadError("expected an activation frame")
                done = assembler.add(frame)
                if done is None:
                    continue
                pos, x = done
                h = await self._run(engine, sid, x.to(engine.device), pos)
                if output is not None:
                    yield encode_reply(*self._sample(engine, sid, h, output))
                else:
                    assert call is not None
                    yield await self._ask_next(call, h, pos)
        finally:
            engine.close_session(sid)
            if call is not None:
                call.cancel()


async def _next_map(frames: AsyncIterator[bytes]) -> dict[str, Any]:
    return rpc.unpack_map(await anext(frames))
