"""NodeAdvert: what a node tells the mesh about itself, as plain frozen data.

The same dict shape (`to_dict`) is the msgpack wire payload and the JSON of `GET /mesh/peers`, so one
validator (`advert_from_dict`) guards every path a peer's bytes can take. Signing and the envelope
live in `envelope.py`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from core.types import MAX_MODEL_ID_CHARS, is_model_id, is_upstream_id
from discovery.tls_cert import MAX_CERT_CHARS, cert_matches
from shard.spec import ShardSpec

# Caps: an advert is a small pointer-sized record; anything bigger is a peer misbehaving.
MAX_MODELS = 64
MAX_LIBP2P_ADDRS = 16
MAX_NAME_CHARS = 64
MAX_SHORT_CHARS = 64  # version, engine, device, alias
MAX_ADDR_CHARS = 256  # "host:port" or a multiaddr
MAX_TTL_S = 120.0  # a silent entry must leave soon; PeerTable also caps what it holds (60 s)
MAX_INT = 2**63 - 1

_HEX_ID = re.compile(r"[0-9a-f]{32}")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


class AdvertError(ValueError):
    """An advert was refused; `reason` is a short code used as a counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Addresses:
    http: str  # "host:port", "" when the node serves no HTTP
    grpc: str  # "host:port", "" when the node serves no gRPC
    libp2p: tuple[str, ...] = ()  # full multiaddrs ending in /p2p/<peer id>


@dataclass(frozen=True, slots=True)
class ModelAdvert:
    digest: str  # sha256 of the GGUF, 64 hex chars, or an upstream model's id (core.types): the identity
    alias: str
    n_layers: int
    start: int  # held layer range [start, end)
    end: int
    engine: str
    ctx: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end <= self.n_layers:
            raise ValueError(f"bad layer range [{self.start}, {self.end}) of {self.n_layers}")
        # an upstream model is only ever held whole, by the engine "upstream", and nothing else is
        if is_upstream_id(self.digest) != (self.engine == "upstream") or (self.engine == "upstream" and not self.whole):
            raise ValueError("an upstream model id is held whole by the upstream engine only")

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.end == self.n_layers

    @property
    def shard(self) -> ShardSpec:
        """The advertised range as the one layer-range type the engine and placement use."""
        return ShardSpec(self.digest, self.start, self.end, self.n_layers)


@dataclass(frozen=True, slots=True)
class FileAdvert:
    """A GGUF the node has on disk and may load layer ranges of when the mesh asks (LoadShard).

    The byte figures are what the node's torch engine would use, so a planner elsewhere (which may not
    have the file) can place the model's layers.
    """

    digest: str
    alias: str
    n_layers: int
    layer_bytes: int
    embed_bytes: int
    head_bytes: int
    kv_bytes_per_token_per_layer: int
    ctx: int
    # the bytes held (weight transfer, docs/weights.md): layers [start, end) with their embedding/head
    # tensors; end 0 means the whole file. `manifest`: the sha256 of its content manifest ("" = none yet)
    start: int = 0
    end: int = 0
    manifest: str = ""

    @property
    def held_end(self) -> int:
        return self.end or self.n_layers

    @property
    def whole_file(self) -> bool:
        return self.start == 0 and self.held_end == self.n_layers


@dataclass(frozen=True, slots=True)
class Resources:
    device: str  # "cpu", "cuda", "mps", ...
    vram_total_bytes: int
    vram_free_bytes: int
    ram_total_bytes: int
    ram_free_bytes: int
    speed_tok_s: float  # measured decode speed figure, 0.0 when unknown
    budget_free_bytes: int = 0  # what --memory-budget leaves for loading more (0: no budget set)


@dataclass(frozen=True, slots=True)
class Load:
    active: int
    queued: int
    capacity: int


@dataclass(frozen=True, slots=True)
class NodeAdvert:
    node_id: str
    name: str
    version: str
    public_key: bytes  # raw 32-byte Ed25519 key; node_id must be its hash
    addresses: Addresses
    models: tuple[ModelAdvert, ...]
    resources: Resources
    load: Load
    seq: int  # strictly increasing per node, across restarts (see docs/discovery.md)
    issued_at: float  # sender's wall clock, seconds since the epoch
    ttl_s: float  # receivers drop the peer ttl_s after the last advert; 0 means goodbye
    files: tuple[FileAdvert, ...] = ()  # GGUFs offered for layer ranges on request
    tls_cert: str = ""  # PEM of the node's data-plane certificate (discovery/tls_cert.py); "" = none
    serve_streams: int = 0  # weight transfer: FetchTensors calls this node serves at once (0: none)

    def to_dict(self) -> dict[str, Any]:
        return advert_to_dict(self)

    @classmethod
    def from_dict(cls, data: Any) -> NodeAdvert:
        return advert_from_dict(data)


def advert_to_dict(a: NodeAdvert) -> dict[str, Any]:
    """JSON-friendly dict (bytes as hex); also the msgpack payload that gets signed."""
    return {
        "node_id": a.node_id,
        "name": a.name,
        "version": a.version,
        "public_key": a.public_key.hex(),
        "addresses": {"http": a.addresses.http, "grpc": a.addresses.grpc, "libp2p": list(a.addresses.libp2p)},
        "models": [
            {
                "digest": m.digest,
                "alias": m.alias,
                "n_layers": m.n_layers,
                "start": m.start,
                "end": m.end,
                "engine": m.engine,
                "ctx": m.ctx,
                "whole": m.whole,
            }
            for m in a.models
        ],
        "resources": {
            "device": a.resources.device,
            "vram_total_bytes": a.resources.vram_total_bytes,
            "vram_free_bytes": a.resources.vram_free_bytes,
            "ram_total_bytes": a.resources.ram_total_bytes,
            "ram_free_bytes": a.resources.ram_free_bytes,
            "speed_tok_s": a.resources.speed_tok_s,
            "budget_free_bytes": a.resources.budget_free_bytes,
        },
        "load": {"active": a.load.active, "queued": a.load.queued, "capacity": a.load.capacity},
        "seq": a.seq,
        "issued_at": a.issued_at,
        "ttl_s": a.ttl_s,
        "files": [
            {
                "digest": f.digest,
                "alias": f.alias,
                "n_layers": f.n_layers,
                "layer_bytes": f.layer_bytes,
                "embed_bytes": f.embed_bytes,
                "head_bytes": f.head_bytes,
                "kv_bytes_per_token_per_layer": f.kv_bytes_per_token_per_layer,
                "ctx": f.ctx,
                **({"start": f.start, "end": f.end} if f.end else {}),
                **({"manifest": f.manifest} if f.manifest else {}),
            }
            for f in a.files
        ],
        "tls_cert": a.tls_cert,
        **({"serve_streams": a.serve_streams} if a.serve_streams else {}),
    }


# --- validation: every field of peer input is type- and range-checked here --------------------------


def _map(d: Any, key: str) -> dict[str, Any]:
    v = d.get(key) if isinstance(d, dict) else None
    if not isinstance(v, dict):
        raise AdvertError("bad_type", f"{key} must be a map")
    return v


def _str(d: dict[str, Any], key: str, max_chars: int, pattern: re.Pattern[str] | None = None) -> str:
    v = d.get(key)
    if not isinstance(v, str):
        raise AdvertError("bad_type", f"{key} must be a string")
    if len(v) > max_chars:
        raise AdvertError("oversized", f"{key} longer than {max_chars}")
    if pattern is not None and not pattern.fullmatch(v):
        raise AdvertError("bad_value", f"{key} has the wrong format")
    return v


def _int(d: dict[str, Any], key: str) -> int:
    v = d.get(key)
    # bool is an int subclass; a peer sending True for a count is malformed, not 1
    if not isinstance(v, int) or isinstance(v, bool):
        raise AdvertError("bad_type", f"{key} must be an integer")
    if not 0 <= v <= MAX_INT:
        raise AdvertError("bad_value", f"{key} out of range")
    return v


def _float(d: dict[str, Any], key: str, max_value: float = 1e18) -> float:
    v = d.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise AdvertError("bad_type", f"{key} must be a number")
    v = float(v)
    if not math.isfinite(v) or not 0.0 <= v <= max_value:
        raise AdvertError("bad_value", f"{key} out of range")
    return v


def _list(d: dict[str, Any], key: str, max_items: int) -> list[Any]:
    v = d.get(key)
    if not isinstance(v, (list, tuple)):
        raise AdvertError("bad_type", f"{key} must be a list")
    if len(v) > max_items:
        raise AdvertError("oversized", f"{key} has more than {max_items} items")
    return list(v)


def _model(m: Any) -> ModelAdvert:
    if not isinstance(m, dict):
        raise AdvertError("bad_type", "model must be a map")
    try:
        return ModelAdvert(
            digest=_model_id(m),
            alias=_str(m, "alias", MAX_SHORT_CHARS),
            n_layers=_int(m, "n_layers"),
            start=_int(m, "start"),
            end=_int(m, "end"),
            engine=_str(m, "engine", MAX_SHORT_CHARS),
            ctx=_int(m, "ctx"),
        )
    except ValueError as e:
        raise AdvertError("bad_value", str(e)) from None


def _model_id(m: dict[str, Any]) -> str:
    model_id = _str(m, "digest", MAX_MODEL_ID_CHARS)
    if not is_model_id(model_id):
        raise AdvertError("bad_value", "digest has the wrong format")
    return model_id


def _file(f: Any) -> FileAdvert:
    if not isinstance(f, dict):
        raise AdvertError("bad_type", "file must be a map")
    n_layers = _int(f, "n_layers")
    start = _int(f, "start") if "start" in f else 0
    end = _int(f, "end") if "end" in f else 0
    if end and not 0 <= start < end <= n_layers:
        raise AdvertError("bad_value", f"bad held range [{start}, {end}) of {n_layers}")
    return FileAdvert(
        digest=_str(f, "digest", 64, _HEX_DIGEST),
        alias=_str(f, "alias", MAX_SHORT_CHARS),
        n_layers=n_layers,
        layer_bytes=_int(f, "layer_bytes"),
        embed_bytes=_int(f, "embed_bytes"),
        head_bytes=_int(f, "head_bytes"),
        kv_bytes_per_token_per_layer=_int(f, "kv_bytes_per_token_per_layer"),
        ctx=_int(f, "ctx"),
        start=start,
        end=end,
        manifest=_str(f, "manifest", 64, _HEX_DIGEST) if "manifest" in f else "",
    )


def advert_from_dict(d: Any) -> NodeAdvert:
    """Builds a NodeAdvert from untrusted data, raising AdvertError (never KeyError/TypeError)."""
    if not isinstance(d, dict):
        raise AdvertError("bad_type", "advert must be a map")
    addrs = _map(d, "addresses")
    res = _map(d, "resources")
    load = _map(d, "load")
    libp2p = _list(addrs, "libp2p", MAX_LIBP2P_ADDRS)
    if not all(isinstance(a, str) and len(a) <= MAX_ADDR_CHARS for a in libp2p):
        raise AdvertError("bad_type", "libp2p addresses must be short strings")
    pub_hex = _str(d, "public_key", 64, _HEX_DIGEST)
    node_id = _str(d, "node_id", 32, _HEX_ID)
    tls_cert = _str(d, "tls_cert", MAX_CERT_CHARS) if "tls_cert" in d else ""
    if tls_cert and not cert_matches(tls_cert, node_id):
        raise AdvertError("bad_cert", "tls_cert is not a P-256 certificate for this node id")
    return NodeAdvert(
        node_id=node_id,
        name=_str(d, "name", MAX_NAME_CHARS),
        version=_str(d, "version", MAX_SHORT_CHARS),
        public_key=bytes.fromhex(pub_hex),
        addresses=Addresses(
            http=_str(addrs, "http", MAX_ADDR_CHARS),
            grpc=_str(addrs, "grpc", MAX_ADDR_CHARS),
            libp2p=tuple(libp2p),
        ),
        models=tuple(_model(m) for m in _list(d, "models", MAX_MODELS)),
        resources=Resources(
            device=_str(res, "device", MAX_SHORT_CHARS),
            vram_total_bytes=_int(res, "vram_total_bytes"),
            vram_free_bytes=_int(res, "vram_free_bytes"),
            ram_total_bytes=_int(res, "ram_total_bytes"),
            ram_free_bytes=_int(res, "ram_free_bytes"),
            speed_tok_s=_float(res, "speed_tok_s"),
            budget_free_bytes=_int(res, "budget_free_bytes"),
        ),
        load=Load(active=_int(load, "active"), queued=_int(load, "queued"), capacity=_int(load, "capacity")),
        seq=_int(d, "seq"),
        issued_at=_float(d, "issued_at"),
        ttl_s=_float(d, "ttl_s", MAX_TTL_S),
        files=tuple(_file(f) for f in _list(d, "files", MAX_MODELS)),
        tls_cert=tls_cert,
        serve_streams=min(_int(d, "serve_streams"), 1024) if "serve_streams" in d else 0,
    )
