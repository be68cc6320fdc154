#!/usr/bin/env python3
"""The floor under a pipeline hop: a grpc.aio stream ping-pong of one token's activation frame
(msgpack, 2.3 KB) in one process, and an asyncio.to_thread round trip.

    .venv/bin/python scripts/bench_grpc_pingpong.py
"""

import asyncio
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dataplane import rpc  # noqa: E402 - after the path set-up above


async def server():
    async def forward(reqs, ctx):
        async for r in reqs:
            yield r[:16]
    s = rpc.build_server({"Forward": rpc.stream_stream(forward)})
    port = s.add_insecure_port("127.0.0.1:0")
    await s.start()
    return s, port

async def main():
    s, port = await server()
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=rpc.CHANNEL_OPTIONS)
    call = ch.stream_stream(rpc.method_path("Forward"), request_serializer=rpc.identity, response_deserializer=rpc.identity)()
    payload = rpc.pack({"a": {"data": b"x" * 2304, "pos": 1, "shape": [1, 576], "dtype": "float32", "i": 0, "n": 1}})
    for _ in range(200):
        await call.write(payload)
        await call.read()
    n = 2000
    t = time.perf_counter()
    for _ in range(n):
        await call.write(payload)
        await call.read()
    rt = (time.perf_counter() - t) / n * 1e3
    print(f"in-process grpc.aio stream ping-pong round trip: {rt:.3f} ms")
    t = time.perf_counter()
    for _ in range(n):
        await asyncio.to_thread(lambda: None)
    print(f"asyncio.to_thread round trip: {(time.perf_counter() - t) / n * 1e3:.3f} ms")
    call.cancel()
    await ch.close()
    await s.stop(0)

if __name__ == "__main__":
    asyncio.run(main())
