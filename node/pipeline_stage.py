"""Pipeline stages over gRPC: stage 0 drives the token loop, each stage pushes activations onward.

`PipelineGenerate` (unary-stream, at stage 0): a Generate request plus the chain
[[grpc address, start, end], ...]. Stage 0 tokenises, runs its layers and opens `Forward`
(stream-stream) to stage 1 with a header; every stage runs its layers on each activation and pushes
the result to the next stage. The last stage samples, turns the token into text (EOS, stop strings,
max_tokens) and answers; the answer travels back along the open streams to stage 0, which feeds the
token into the next step and streams the chunk to the gateway. Closing or cancelling any stream
cancels the others, and every stage frees the session's KV cache in `finally`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any

import grpc
import torch

from engine.local_models import LocalModel, LocalModels
from engine.token_output import TokenOutput
from engine.torch_engine import SessionError, SessionLimitError, TorchShardEngine
from engine.torch_generate import prompt_tokens
from engine.types import Chunk, SamplingParams
from gateway.remote import PeerChannels
from node import rpc
from node.generate_wire import DIGEST, decode_chunk, decode_request, encode_chunk
from shard.activation_wire import ActivationAssembler, ActivationError, encode_activation

log = logging.getLogger(__name__)
STEP_TIMEOUT_S = 60.0  # a neighbour silent this long has failed
MAX_CHAIN = 64


class StageError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _chain(value: Any) -> list[tuple[str, int, int]]:
    if not isinstance(value, list) or not 0 < len(value) <= MAX_CHAIN:
        raise rpc.PayloadError("chain must be a non-empty list")
    out = []
    for hop in value:
        if not (isinstance(hop, list) and len(hop) == 3 and isinstance(hop[0], str) and len(hop[0]) <= 256
                and all(isinstance(v, int) and v >= 0 for v in hop[1:])):
            raise rpc.PayloadError("chain entries are [address, start, end]")
        out.append((hop[0], hop[1], hop[2]))
    return out


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
    def _stage(self, digest: str, start: int, end: int) -> TorchShardEngine:
        local: LocalModel | None = self._local.resolve(digest)
        if local is None or local.layer_range != (start, end) or not isinstance(local.runner.engine, TorchShardEngine):
            raise StageError(grpc.StatusCode.NOT_FOUND, f"layers [{start}, {end}) of {digest[:12]} are not held here")
        return local.runner.engine

    def _open(self, engine: TorchShardEngine, sid: str, params: SamplingParams | None) -> None:
        try:
            engine.open_session(sid, params)
        except SessionLimitError as e:
            raise StageError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        except SessionError as e:
            raise StageError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None

    async def _run(self, engine: TorchShardEngine, sid: str, x: torch.Tensor, pos: int) -> torch.Tensor:
        # Blocking torch work off the loop; concurrent sessions' steps are batched by the engine.
        def timed() -> tuple[torch.Tensor, float]:
            started = time.perf_counter()
            result = engine.forward_stage([sid], [x], [pos])[0]
            return result, time.perf_counter() - started  # compute alone, without the thread hand-off

        try:
            if engine.n_sessions == 1 and x.shape[0] == 1:
                # A lone session's decode step has nothing to batch with: run it inline and save two
                # thread hand-offs per token (the loop is busy for one step, as the engine would be).
                out, compute_s = timed()
            else:
                out, compute_s = await asyncio.to_thread(timed)
        except SessionError as e:
            raise StageError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
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
            raise StageError(grpc.StatusCode.UNAVAILABLE, "next stage timed out") from None
        except grpc.aio.AioRpcError as e:
            raise StageError(grpc.StatusCode.UNAVAILABLE, f"next stage failed: {e.code().name} {e.details()}") from None
        if raw is grpc.aio.EOF:
            raise StageError(grpc.StatusCode.UNAVAILABLE, "next stage closed the stream")
        return rpc.unpack_map(raw)

    async def _abort(self, context: grpc.aio.ServicerContext, e: Exception) -> None:
        if isinstance(e, StageError):
            await context.abort(e.code, str(e))
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    # --- stage 0 -------------------------------------------------------------------------------
    async def pipeline_generate(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        if not rpc.check_token(context, self._token):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "not a member of this mesh")
        try:
            obj = rpc.unpack_map(request)
            digest, generation = decode_request(obj)
            chain = _chain(obj.get("chain"))
            engine = self._stage(digest, chain[0][1], chain[0][2])
        except (rpc.PayloadError, StageError) as e:
            await self._abort(context, e)
        ids = prompt_tokens(engine, generation)
        room = engine.max_context - len(ids)
        wanted = generation.params.max_tokens
        if room <= 0 or (wanted is not None and wanted > room):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"this pipeline's context is {engine.max_context} tokens; the prompt has {len(ids)} "
                                f"and {wanted or 1} more were requested")
        sid = f"p-{uuid.uuid4().hex}"
        single = len(chain) == 1
        call = None
        try:
            self._open(engine, sid, generation.params if single else None)
            self.sessions_opened += 1
            output = TokenOutput(engine.tokenizer, generation.params.stop, len(ids), wanted or room) if single else None
            if not single:
                call = self._next_call(chain[1][0])
                header = {"sid": sid, "model": digest, "chain": [list(h) for h in chain[1:]],
                          "params": {**_params(generation.params)}, "prompt_len": len(ids), "max_new": wanted or room}
                await call.write(rpc.pack({"h": header}))
            x, pos = torch.tensor(ids), 0
            while True:
                h = await self._run(engine, sid, x, pos)
                pos += x.shape[0]
                if output is not None:  # one stage holds it all: sample here
                    token = engine.sample([sid], h)[0]
                    chunk = output.push(token)
                else:
                    reply = await self._ask_next(call, h, pos - x.shape[0])
                    chunk, token = _reply_chunk(reply)
                yield rpc.pack(encode_chunk(chunk))
                if chunk.finish_reason is not None:
                    return
                x = torch.tensor([token])
        except (StageError, rpc.PayloadError) as e:
            await self._abort(context, e)
        finally:
            engine.close_session(sid)
            if call is not None:
                call.cancel()

    # --- stages 1..n-1 -------------------------------------------------------------------------
    async def forward(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        if not rpc.check_token(context, self._token):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "not a member of this mesh")
        frames = requests.__aiter__()
        engine = sid = call = None
        try:
            header = _header(await _next_map(frames))
            chain = header["chain"]
            engine = self._stage(header["model"], chain[0][1], chain[0][2])
            last = len(chain) == 1
            sid = header["sid"]
            self._open(engine, sid, header["params"] if last else None)
            self.sessions_opened += 1
            output = TokenOutput(engine.tokenizer, header["params"].stop, header["prompt_len"], header["max_new"]) if last else None
            if not last:
                call = self._next_call(chain[1][0])
                await call.write(rpc.pack({"h": {**header["raw"], "chain": [list(h) for h in chain[1:]]}}))
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
                    token = engine.sample([sid], h)[0]
                    chunk = output.push(token)
                    reply = {**encode_chunk(chunk), "tok": token}
                else:
                    reply = await self._ask_next(call, h, pos)
                yield rpc.pack(reply)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "previous stage went silent")
        except (StageError, rpc.PayloadError, ActivationError) as e:
            await self._abort(context, e)
        finally:
            if engine is not None and sid is not None:
                engine.close_session(sid)
            if call is not None:
                call.cancel()


def _params(p: SamplingParams) -> dict[str, Any]:
    return {**asdict(p), "stop": list(p.stop)}


async def _next_map(frames: AsyncIterator[bytes]) -> dict[str, Any]:
    return rpc.unpack_map(await frames.__anext__())


def _header(obj: dict[str, Any]) -> dict[str, Any]:
    h = obj.get("h")
    if not isinstance(h, dict):
        raise rpc.PayloadError("the first message must be a header")
    sid, digest = h.get("sid"), h.get("model")
    if not (isinstance(sid, str) and 0 < len(sid) <= 128 and isinstance(digest, str) and DIGEST.match(digest)):
        raise rpc.PayloadError("header needs sid and model")
    prompt_len, max_new = h.get("prompt_len"), h.get("max_new")
    if not (isinstance(prompt_len, int) and isinstance(max_new, int) and prompt_len >= 0 and max_new >= 1):
        raise rpc.PayloadError("header needs prompt_len and max_new")
    _, probe = decode_request({"model": digest, "prompt": "", "params": h.get("params")})
    return {"sid": sid, "model": digest, "chain": _chain(h.get("chain")), "params": probe.params,
            "prompt_len": prompt_len, "max_new": max_new, "raw": h}


def _reply_chunk(reply: dict[str, Any]) -> tuple[Chunk, int]:
    token = reply.get("tok")
    if not isinstance(token, int) or token < 0:
        raise rpc.PayloadError("reply without a token")
    return decode_chunk(reply), token

