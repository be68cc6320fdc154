"""Pipeline stages over gRPC: stage 0 drives the token loop, each stage pushes activations onward.

`PipelineGenerate` (unary-stream, at stage 0): a Generate request plus the chain
[[node id, start, end], ...]; each stage resolves the next node id in its own PeerTable
(`next_stage.py`), never an address from the request. Stage 0 tokenises, runs its layers and opens `Forward`
(stream-stream) to stage 1 with a header; every stage runs its layers on each activation and pushes
the result to the next stage. The last stage samples, turns the token into text (`TokenOutput`: EOS,
stop strings, max_tokens) and answers; the answer travels back along the open streams to stage 0,
which feeds the token into the next step and streams the chunk to the gateway.

A stage's session is admitted by its model's runner like a whole-model request (the same bounded
queue, the same `Busy` → 429) and counted in its load. Closing or cancelling any stream cancels the
others, and every stage frees the session's KV slot in `finally`.

Hostile members (issue 11): activations are checked against the stage (hidden size, dtype, token
count) on their first frame, before anything is buffered, and by the engine before batching, so a
bad step fails its own session only; one peer holds at most `per_peer_cap` sessions, and a session
idle for longer than its cadence allows is closed (`stage_sessions.py`); server streams heartbeat
and next stages are watched for silence (`liveness.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing

import grpc
import torch

from core.errors import BadRequest, Busy, Internal, MeshError, ModelNotFound, Unavailable
from core.types import Chunk, SamplingParams
from dataplane import rpc
from dataplane.channels import PeerChannels
from dataplane.liveness import Beating
from dataplane.next_stage import NextStage
from dataplane.replay import Replay
from dataplane.service import IsMember, authorise
from dataplane.stage_batcher import LoopBatcher
from dataplane.stage_sessions import FRAME_TIMEOUT_S, SessionBook, peer_key, per_peer_cap
from dataplane.stage_wire import (
    Header,
    decode_chain,
    decode_group,
    decode_header,
    decode_reply,
    decode_resume,
    encode_reply,
)
from dataplane.status import abort
from dataplane.wire import decode_request, encode_chunk
from engine.local_models import LocalModel, LocalModels
from engine.sampling import SamplerState, sample
from engine.session_errors import KVFullError, SessionError, SessionLimitError
from engine.token_output import TokenOutput
from engine.torch_engine import TorchShardEngine
from engine.torch_generate import prompt_tokens, resumed_ids, sampler_state_off_loop
from engine.types import check_context
from placement.cluster import Stage
from shard.activation_wire import ActivationAssembler, ActivationError, ActivationLimits
from shard.spec import ShardSpec

log = logging.getLogger(__name__)
_DECODE_ERRORS = (rpc.PayloadError, ActivationError)


class PipelineService:
    def __init__(self, local: LocalModels, channels: PeerChannels, token: str,
                 on_step: Callable[[str, int, float], None] | None = None, *,
                 per_peer: int | None = None, clock: Callable[[], float] = time.monotonic,
                 is_member: IsMember | None = None) -> None:
        self._local = local
        self._channels = channels
        self._token = token
        self._is_member = is_member
        self._on_step = on_step or (lambda digest, n_positions, compute_s: None)
        self._per_peer = per_peer
        self._clock = clock
        self._books: dict[str, SessionBook] = {}  # by model digest (one engine each)
        # one per engine, gone with it (an unloaded range's engine must be freed; the batcher holds it weakly)
        self._batchers: weakref.WeakKeyDictionary[TorchShardEngine, LoopBatcher] = weakref.WeakKeyDictionary()
        self.sessions_opened = 0

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {
            "PipelineGenerate": rpc.unary_stream(self.pipeline_generate),
            "Forward": rpc.stream_stream(self.forward),
        }

    # --- helpers ---------------------------------------------------------------------------------
    def _stage(self, digest: str, hop: Stage) -> tuple[LocalModel, TorchShardEngine]:
        local = self._local.resolve(digest)
        if local is not None and isinstance(local.runner.engine, TorchShardEngine):
            n_layers = local.model.n_layers
            if hop.end <= n_layers and hop.start < hop.end and local.shard == ShardSpec(digest, hop.start, hop.end, n_layers):
                return local, local.runner.engine
        raise ModelNotFound(digest, [], f"layers [{hop.start}, {hop.end}) of {digest[:12]} are not held here")

    def _book(self, engine: TorchShardEngine) -> SessionBook:
        digest = engine.model.digest
        if digest not in self._books:
            cap = self._per_peer or per_peer_cap(engine.max_sessions)
            self._books[digest] = SessionBook(cap, self._clock)
        return self._books[digest]

    def _open(self, engine: TorchShardEngine, sid: str, params: SamplingParams | None, ring: int = 1) -> None:
        try:
            engine.open_session(sid, params, ring=ring)
        except SessionLimitError as e:
            raise Busy(1, str(e)) from None
        except SessionError as e:
            raise BadRequest(str(e)) from None
        self.sessions_opened += 1

    def _batcher(self, engine: TorchShardEngine) -> LoopBatcher:
        batcher = self._batchers.get(engine)
        if batcher is None:
            batcher = self._batchers[engine] = LoopBatcher(engine, engine.batch_wait_s)
        return batcher

    async def _run(self, engine: TorchShardEngine, sid: str, x: torch.Tensor, pos: int,
                   group: int | None = None) -> tuple[torch.Tensor, int | None]:
        """One step of a session: its output, and the size of the decode batch it ran in (None for a
        prompt). `group`: the size of the batch that made x at the previous stage (stage_batcher.py)."""

        def timed() -> tuple[torch.Tensor, float]:
            started = time.perf_counter()
            result = engine.forward_stage([sid], [x], [pos])[0]
            return result, time.perf_counter() - started  # compute alone, without the thread hand-off

        size = None
        try:
            if x.shape[0] == 1:  # decode: batched on this loop with the other sessions' steps
                out, compute_s, size = await self._batcher(engine).step(sid, x, pos, group)
            else:  # a prompt: off the loop, in chunks between other sessions' decode steps
                out, compute_s = await asyncio.to_thread(timed)
        except KVFullError as e:  # the pool is spent by other sessions: busy, not a bad request
            raise Busy(1, str(e)) from None
        except SessionError as e:  # includes an input that does not fit this stage
            raise BadRequest(str(e), code="invalid_activation") from None
        except Exception:
            log.exception("stage step of %s failed", sid)
            raise Internal("the stage step failed") from None
        self._on_step(engine.model.digest, x.shape[0], compute_s)
        return out, size

    def _sample(self, state: SamplerState, h: torch.Tensor, output: TokenOutput) -> tuple[Chunk, int]:
        """The last stage's half of the token loop: sample (grammar, logprobs: `state`), then text,
        EOS, stop strings, max_tokens."""
        token = sample([state], h)[0]
        return output.push_sampled(token, state), token

    # --- stage 0 -------------------------------------------------------------------------------
    async def pipeline_generate(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        await authorise(context, self._token, self._is_member)
        async with Beating(context) as out:
            error = await self._generate(request, out, peer_key(context))
        if error is not None:
            await abort(context, error)

    async def _generate(self, request: bytes, out: Beating, peer: str) -> MeshError | None:
        try:
            obj = rpc.unpack_map(request)
            digest, generation = decode_request(obj)
            chain = decode_chain(obj.get("chain"))
            resume = decode_resume(obj.get("resume"))  # a failed-over stream: ids generated so far
            local, engine = self._stage(digest, chain[0])
            ids = await asyncio.to_thread(prompt_tokens, engine, generation)  # chat template + tokenizer
            wanted = generation.params.max_tokens
            cont = await asyncio.to_thread(resumed_ids, engine, generation, ids)
            if cont:  # another holder's text under a grammar: the chain replays its ids, the grammar sees them
                ids, resume = ids[: len(ids) - len(cont)], (*cont, *resume)
                wanted = wanted + len(cont) if wanted is not None else None
            max_new = check_context(engine.max_context, len(ids), wanted, what="this pipeline's")
            if len(resume) >= max_new:
                raise BadRequest("the resumed stream already has all its tokens", code="invalid_resume")
            async with local.runner.admit(), aclosing(
                self._drive(engine, digest, chain, ids, max_new, generation.params, peer, resume)
            ) as chunks:
                async for chunk in chunks:
                    await out.write(rpc.pack(encode_chunk(chunk)))
        except rpc.PayloadError as e:
            return BadRequest(str(e))
        except MeshError as e:
            return e
        except Exception:
            log.exception("pipeline stage 0 failed")
            return Internal("the pipeline stage failed")
        return None

    async def _drive(self, engine: TorchShardEngine, digest: str, chain: list[Stage], ids: list[int], max_new: int,
                     params: SamplingParams, peer: str, resume: tuple[int, ...] = ()) -> AsyncGenerator[Chunk, None]:
        sid = f"p-{uuid.uuid4().hex}"
        single = len(chain) == 1
        book = self._book(engine)
        book.open(sid, peer)
        nxt = None
        try:
            self._open(engine, sid, params if single else None, ring=len(chain))
            output = TokenOutput(engine.tokenizer, params.stop, len(ids), max_new) if single else None
            state = await sampler_state_off_loop(params, engine.model.path, engine.device) if single else None
            if not single:
                nxt = NextStage(self._channels, Header(sid, digest, chain[1:], params, len(ids), max_new, resume))
            replay = Replay(resume)  # resumed: the prompt in one step, then each generated id in one
            x, pos, group = torch.tensor(ids), 0, None
            while True:
                h, size = await self._run(engine, sid, x, pos, group)
                book.step(sid)
                pos += x.shape[0]
                if output is not None and state is not None:  # one stage holds it all: sample here
                    chunk, token = self._sample(state, replay.logits(h) if replay.active else h, output)
                else:
                    assert nxt is not None
                    reply = await nxt.ask(h, pos - x.shape[0], size)
                    chunk, token = decode_reply(reply)
                    group = decode_group(reply)  # the last stage's batch: ours, next step
                if replay.active:  # a replayed step: the client had its chunk
                    replay.check(chunk, token)
                    x = torch.tensor([token])
                    continue
                yield chunk
                if chunk.finish_reason is not None:
                    return
                x = torch.tensor([token])
        except rpc.PayloadError as e:
            raise Unavailable(f"the pipeline answered badly: {e}", code="pipeline_failed") from None
        finally:
            book.close(sid)
            engine.close_session(sid)
            if nxt is not None:
                nxt.close()

    # --- stages 1..n-1 -------------------------------------------------------------------------
    async def forward(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        await authorise(context, self._token, self._is_member)
        async with Beating(context) as out:
            error = await self._forward(requests.__aiter__(), out, peer_key(context))
        if error is not None:
            await abort(context, error)

    async def _forward(self, frames: AsyncIterator[bytes], out: Beating, peer: str) -> MeshError | None:
        try:
            async with asyncio.timeout(FRAME_TIMEOUT_S):
                header = decode_header(await _next_map(frames))
            local, engine = self._stage(header.model, header.chain[0])
            async with local.runner.admit():
                await self._relay(engine, header, frames, out, peer)
        except StopAsyncIteration:
            return None  # the previous stage hung up
        except TimeoutError:
            return Unavailable("previous stage went silent", code="pipeline_failed")
        except _DECODE_ERRORS as e:
            return BadRequest(str(e), code="invalid_activation")
        except MeshError as e:
            return e
        except Exception:
            log.exception("pipeline stage failed")
            return Internal("the pipeline stage failed")
        return None

    async def _relay(self, engine: TorchShardEngine, header: Header, frames: AsyncIterator[bytes], out: Beating,
                     peer: str) -> None:
        last = len(header.chain) == 1
        replay = Replay(header.resume)  # a resumed stream: its first steps replay these ids
        sid = f"f-{uuid.uuid4().hex}"  # ours: a peer cannot pick (or collide with) a session id here
        book = self._book(engine)
        book.open(sid, peer)
        nxt = None
        try:
            self._open(engine, sid, header.params if last else None)
            output = TokenOutput(engine.tokenizer, header.params.stop, header.prompt_len, header.max_new) if last else None
            state = await sampler_state_off_loop(header.params, engine.model.path, engine.device) if last else None
            if not last:
                nxt = NextStage(self._channels, header.onward())
            assembler = ActivationAssembler(ActivationLimits(engine.config.hidden_size, engine.max_context))
            while True:
                timeout_s = FRAME_TIMEOUT_S if assembler.in_progress else book.idle_timeout_s(sid)
                try:
                    async with asyncio.timeout(timeout_s):
                        obj = await _next_map(frames)
                except StopAsyncIteration:
                    return  # the previous stage finished or hung up
                except TimeoutError:
                    raise Unavailable(f"no step for {timeout_s:.0f} s: session closed", code="pipeline_failed") from None
                frame = obj.get("a")
                if not isinstance(frame, dict):
                    raise rpc.PayloadError("expected an activation frame")
                done = assembler.add(frame)
                if done is None:
                    continue
                pos, x = done
                book.step(sid)
                x = x.to(engine.device, dtype=engine.shard.dtype)
                h, size = await self._run(engine, sid, x, pos, decode_group(obj))
                if output is not None and state is not None:
                    if replay.active:  # a resumed stream's replayed step: draw the id it had drawn
                        chunk, token = self._sample(state, replay.logits(h), output)
                        replay.check(chunk, token)
                        await out.write(rpc.pack(encode_reply(chunk, token, size)))
                        continue
                    await out.write(rpc.pack(encode_reply(*self._sample(state, h, output), size)))
                else:
                    assert nxt is not None
                    await out.write(rpc.pack(await nxt.ask(h, pos, size)))
        finally:
            book.close(sid)
            engine.close_session(sid)
            if nxt is not None:
                nxt.close()


async def _next_map(frames: AsyncIterator[bytes]) -> dict:
    return rpc.unpack_map(await anext(frames))
