"""A member attacks pipeline stages over gRPC (issue 11, findings 6, 7, 9, 10): chains naming
addresses, lying activation shapes, huge announced tensors, a SIGSTOPped stage. Each attack fails,
and the mesh keeps serving."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time
import urllib.request
from dataclasses import dataclass

import grpc
import psutil
import pytest
from mesh_member import Member

from dataplane import rpc
from dataplane.stage_sessions import per_peer_cap
from discovery.envelope import derive_subkey, mesh_key_from_secret
from shard.memory import SESSIONS_PER_CONTEXT

MODEL = "smollm2-135m-instruct"
HIDDEN = 576
SECRET = "dp-" + secrets.token_hex(4)
TOKEN = derive_subkey(mesh_key_from_secret(SECRET), "grpc-token").hex()
META = ((rpc.AUTH_KEY, TOKEN),)


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def complete(url: str, max_tokens: int = 8) -> dict:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def rss_bytes(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


@pytest.fixture(scope="module")
def mesh(module_node_factory):
    nodes = module_node_factory.many({
        "G": ("--no-model", "--mesh-secret", SECRET),
        "S1": ("--shard", f"{MODEL}:0-7", "--threads", "1", "--mesh-secret", SECRET),
        "S2": ("--shard", f"{MODEL}:7-30", "--threads", "1", "--mesh-secret", SECRET),
    })
    member = Member(SECRET)  # the attacker is a member: its certificate gets it through mTLS
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        models = get_json(nodes["G"].url + "/v1/models")["data"]
        listed = all(member.node_id in {p["node_id"] for p in get_json(nodes[n].url + "/mesh/peers")} for n in ("S1", "S2"))
        if listed and models and models[0]["meshllm"]["nodes"] == ["S1", "S2"]:
            break
        time.sleep(0.2)
    me = {n: get_json(nodes[n].url + "/mesh/self") for n in ("S1", "S2")}
    yield nodes, {n: Peer(member, a["node_id"], a["addresses"]["grpc"], a["tls_cert"]) for n, a in me.items()}
    member.stop()


@dataclass(frozen=True)
class Peer:
    member: Member
    node_id: str
    address: str
    cert: str

    def channel(self) -> grpc.aio.Channel:
        return self.member.aio_channel(self.node_id, self.address, self.cert)


async def _pipeline_generate(peer: Peer, chain: list) -> grpc.StatusCode:
    async with peer.channel() as channel:
        call = channel.unary_stream(rpc.method_path("PipelineGenerate"), request_serializer=rpc.identity,
                                    response_deserializer=rpc.identity)
        payload = {"model": "0" * 64, "prompt": "hi", "params": {"max_tokens": 2}, "chain": chain}
        try:
            async for _ in call(rpc.pack(payload), metadata=META, timeout=20):
                pass
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


async def _forward(peer: Peer, messages: list[dict]) -> tuple[grpc.StatusCode, str]:
    async with peer.channel() as channel:
        call = channel.stream_stream(rpc.method_path("Forward"), request_serializer=rpc.identity,
                                     response_deserializer=rpc.identity)(metadata=META, timeout=20)
        try:
            for m in messages:
                await call.write(rpc.pack(m))
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    break
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details() or ""
        return grpc.StatusCode.OK, ""


def header(s2_id: str, digest: str) -> dict:
    params = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": None, "stop": [],
              "max_tokens": 4, "presence_penalty": 0.0, "frequency_penalty": 0.0}
    return {"h": {"sid": "x", "model": digest, "chain": [[s2_id, 7, 30]], "params": params, "prompt_len": 1,
                  "max_new": 4}}


def act(shape: list[int], data: bytes, n: int = 1) -> dict:
    return {"a": {"pos": 0, "dtype": "float32", "shape": shape, "i": 0, "n": n, "data": data}}


def test_chains_naming_addresses_are_refused(mesh):
    nodes, ids = mesh
    s1 = ids["S1"]
    assert asyncio.run(_pipeline_generate(s1, [[s1.node_id, 0, 7], ["127.0.0.1:22", 7, 30]])) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert asyncio.run(_pipeline_generate(s1, [["10.1.2.3:50051", 0, 7]])) == grpc.StatusCode.INVALID_ARGUMENT
    assert complete(nodes["G"].url)["choices"][0]["text"]


def test_lying_and_huge_activations_fail_alone_and_memory_stays(mesh):
    nodes, ids = mesh
    s2 = ids["S2"]
    s2_id = s2.node_id
    digest = get_json(nodes["G"].url + "/v1/models")["data"][0]["meshllm"]["digest"]
    before = rss_bytes(nodes["S2"].proc.pid)
    code, details = asyncio.run(_forward(s2, [header(s2_id, digest), act([1, 577], b"\0" * 577 * 4)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "shape" in details and "Traceback" not in details
    for _ in range(4):  # 256 MiB announced, one frame sent: refused before any buffering
        code, _ = asyncio.run(_forward(s2, [header(s2_id, digest), act([65536, 1024], b"\0" * (1 << 20), n=256)]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert rss_bytes(nodes["S2"].proc.pid) - before < 64 << 20
    assert complete(nodes["G"].url)["choices"][0]["text"]


async def _hold_sessions(peer: Peer, s2_id: str, digest: str, n: int, then) -> list[grpc.StatusCode | None]:
    """Opens n Forward sessions on S2 (a header each, no activation yet), one by one, runs `then()` in a
    thread while they are held, and hangs up. A session's status is None while it stays open."""
    async with peer.channel() as channel:
        method = channel.stream_stream(rpc.method_path("Forward"), request_serializer=rpc.identity,
                                       response_deserializer=rpc.identity)
        calls, codes = [], []
        for _ in range(n):
            call = method(metadata=META, timeout=25)
            await call.write(rpc.pack(header(s2_id, digest)))
            calls.append(call)
            try:  # refused at once, or held: heartbeats come every 0.5 s while it waits for a step
                await asyncio.wait_for(call.read(), 3)
                codes.append(None)
            except grpc.aio.AioRpcError as e:
                codes.append(e.code())
        await asyncio.to_thread(then)
        for call in calls:
            call.cancel()
    return codes


def test_one_member_holds_at_most_its_share_of_slots_even_from_loopback(mesh):
    """The cap counts the node id the member's certificate proves, not its host: loopback, where every
    node of this mesh lives, is not exempt. The other members' requests still find a slot, and the
    stage's memory returns once the sessions close."""
    nodes, ids = mesh
    s2 = ids["S2"]
    digest = get_json(nodes["G"].url + "/v1/models")["data"][0]["meshllm"]["digest"]
    pid = nodes["S2"].proc.pid
    complete(nodes["G"].url)  # warm: the first request's allocations are not the attack's
    before = rss_bytes(pid)
    answers = []
    # S2 runs 16 sessions (--kv-sessions 4, paged: 4 sessions per full context): one peer holds at most 12
    slots = 4 * SESSIONS_PER_CONTEXT
    cap = per_peer_cap(slots)
    codes = asyncio.run(
        _hold_sessions(s2, s2.node_id, digest, cap + 1, lambda: answers.append(complete(nodes["G"].url)))
    )
    assert cap == 12 and codes == [None] * cap + [grpc.StatusCode.RESOURCE_EXHAUSTED], codes
    assert answers and answers[0]["choices"][0]["text"]  # served while the member held its 3 slots
    deadline = time.monotonic() + 10
    while get_json(nodes["S2"].url + "/mesh/self")["load"]["active"]:  # the stage closes the hung-up sessions
        assert time.monotonic() < deadline, "S2 kept the member's sessions after it hung up"
        time.sleep(0.05)
    for _ in range(3):
        assert complete(nodes["G"].url)["choices"][0]["text"]  # every slot is free again
    grown = rss_bytes(pid) - before
    print(f"S2 RSS after the sessions closed: {grown / 2**20:+.1f} MiB")
    assert grown < 64 << 20


def test_a_stopped_stage_is_detected_within_5_s(mesh):
    """Runs last: SIGSTOPs the last stage mid-stream."""
    nodes, _ = mesh
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0, "stream": True}
    req = urllib.request.Request(nodes["G"].url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    resp = urllib.request.urlopen(req, timeout=60)
    for i, _ in enumerate(resp):
        if i >= 4:
            break
    nodes["S2"].proc.send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        error = None
        for line in resp:
            if line.startswith(b"data: {") and b'"error"' in line:
                error = json.loads(line[6:])["error"]
                break
        detected_s = time.monotonic() - stopped_at
    finally:
        nodes["S2"].proc.send_signal(signal.SIGCONT)
        resp.close()
    print(f"stopped stage detected in {detected_s:.2f} s")
    assert error is not None
    assert detected_s < 5.0, f"took {detected_s:.1f} s"

