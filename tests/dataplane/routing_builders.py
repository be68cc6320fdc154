"""Tiny builders for routing tests: adverts of fake holders, and a router over them with no processes."""

from __future__ import annotations

from discovery.advert import Addresses, FileAdvert, Load, ModelAdvert, NodeAdvert, Resources

M = "a" * 64
OTHER = "b" * 64


def node(node_id: str, *, digest: str = M, start: int = 0, end: int = 30, active: int = 0, capacity: int = 4,
         speed: float = 0.0, alias: str = "m", files: tuple[FileAdvert, ...] = ()) -> NodeAdvert:
    models = (ModelAdvert(digest, alias, 30, start, end, "llama.cpp", 2048),) if digest else ()
    return NodeAdvert(node_id, f"name-{node_id}", "0", b"k" * 32, Addresses("h:1", f"{node_id}:2"), models,
                      Resources("cpu", 0, 0, 1 << 30, 1 << 30, speed), Load(active, 0, capacity), 1, 0.0, 10.0,
                      files=files)


def offer(digest: str = OTHER, alias: str = "big") -> FileAdvert:
    return FileAdvert(digest=digest, alias=alias, n_layers=30, layer_bytes=1 << 20, embed_bytes=1 << 20,
                      head_bytes=1 << 20, kv_bytes_per_token_per_layer=64, ctx=2048)
