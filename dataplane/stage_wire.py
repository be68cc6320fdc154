"""Payloads of the pipeline calls: the chain of stages, the `Forward` header and a stage's reply.

A chain names nodes by their node id, never by address: every stage resolves the next node id in its
own PeerTable (`PeerChannels.channel_to`), so a request cannot make a node connect to an address of
its choosing (issue 11, finding 6).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from core.types import Chunk, SamplingParams
from dataplane.rpc import PayloadError
from dataplane.wire import DIGEST, decode_chunk, decode_request, encode_chunk
from placement.cluster import Stage

MAX_CHAIN = 64
MAX_RESUME = 1 << 16  # generated ids a resumed stream re-prefills (capped again by the stage's context)
MAX_TOKEN_ID = 1 << 24
MAX_GROUP = 4096  # a batch size a frame may name; the receiver caps it by its open sessions
NODE_ID = re.compile(r"^[0-9a-f]{32}$")


def encode_chain(hops: list[Stage]) -> list[list[Any]]:
    """A chain on the wire: [[node id, start, end], ...] (placement's Stage, one per hop)."""
    return [[h.node, h.start, h.end] for h in hops]


def decode_chain(value: Any) -> list[Stage]:
    if not isinstance(value, list) or not 0 < len(value) <= MAX_CHAIN:
        raise PayloadError("chain must be a non-empty list")
    out = []
    for hop in value:
        if not (isinstance(hop, list) and len(hop) == 3 and isinstance(hop[0], str) and NODE_ID.match(hop[0])
                and all(isinstance(v, int) and 0 <= v <= 1 << 16 for v in hop[1:]) and hop[1] < hop[2]):
            raise PayloadError("chain entries are [node id, start, end]")
        out.append(Stage(hop[0], hop[1], hop[2]))
    return out


@dataclass(frozen=True, slots=True)
class Header:
    """The first message of a `Forward` stream: the session and the rest of the chain from here."""

    sid: str
    model: str
    chain: list[Stage]
    params: SamplingParams
    prompt_len: int
    max_new: int
    resume: tuple[int, ...] = ()  # ids generated before a failover: the last stage replays them (issue 14)

    def encode(self) -> dict[str, Any]:
        out = {"sid": self.sid, "model": self.model, "chain": encode_chain(self.chain),
               "params": {**asdict(self.params), "stop": list(self.params.stop)},
               "prompt_len": self.prompt_len, "max_new": self.max_new}
        return {**out, "resume": list(self.resume)} if self.resume else out

    def onward(self) -> Header:
        """The header the next stage gets: the chain without this stage."""
        return Header(self.sid, self.model, self.chain[1:], self.params, self.prompt_len, self.max_new, self.resume)


def decode_resume(value: Any) -> tuple[int, ...]:
    """The ids a resumed pipeline stream already generated ([] or absent: a fresh stream)."""
    if value is None:
        return ()
    if not (isinstance(value, list) and len(value) <= MAX_RESUME
            and all(type(t) is int and 0 <= t < MAX_TOKEN_ID for t in value)):
        raise PayloadError("resume must be a list of token ids")
    return tuple(value)


def decode_header(obj: dict[str, Any]) -> Header:
    h = obj.get("h")
    if not isinstance(h, dict):
        raise PayloadError("the first message must be a header")
    sid, digest = h.get("sid"), h.get("model")
    if not (isinstance(sid, str) and 0 < len(sid) <= 128 and isinstance(digest, str) and DIGEST.match(digest)):
        raise PayloadError("header needs sid and model")
    prompt_len, max_new = h.get("prompt_len"), h.get("max_new")
    if not (isinstance(prompt_len, int) and isinstance(max_new, int) and prompt_len >= 0 and max_new >= 1):
        raise PayloadError("header needs prompt_len and max_new")
    _, probe = decode_request({"model": digest, "prompt": "", "params": h.get("params")})
    resume = decode_resume(h.get("resume"))
    if len(resume) >= max_new:
        raise PayloadError("resume holds every token the stream may generate")
    return Header(sid, digest, decode_chain(h.get("chain")), probe.params, prompt_len, max_new, resume)


def encode_reply(chunk: Chunk, token: int, group: int | None) -> dict[str, Any]:
    """The last stage's answer to one step: the chunk, the token stage 0 feeds back in, and the size
    of the decode batch the step ran in (`decode_group`; None for a prompt)."""
    reply = {**encode_chunk(chunk), "tok": token}
    return reply if group is None else {**reply, "b": group}


def decode_group(obj: dict[str, Any]) -> int | None:
    """`b` of an activation frame or a reply: the size of the batch the sending stage ran the step in,
    so that the receiving stage waits for that many steps before it runs a batch
    (dataplane/stage_batcher.py). Absent from older nodes: None."""
    group = obj.get("b")
    if group is None:
        return None
    if not isinstance(group, int) or isinstance(group, bool) or not 1 <= group <= MAX_GROUP:
        raise PayloadError(f"b must be a batch size in [1, {MAX_GROUP}]")
    return group


def decode_reply(reply: dict[str, Any]) -> tuple[Chunk, int]:
    token = reply.get("tok")
    if not isinstance(token, int) or token < 0:
        raise PayloadError("reply without a token")
    return decode_chunk(reply), token
