"""Node configuration: one frozen dataclass built from the command line."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from discovery.service import DEFAULT_TTL_S
from engine.upstream import UpstreamConfig
from gateway.app import BODY_TIMEOUT_S, HEADER_TIMEOUT_S


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "meshllm"


WEIGHTS = ("quantized", "full")


MAX_CLIENT_TIMEOUT_S = 600.0  # a half-sent request holds a connection: not for ever (NaN fails the check too)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    models: tuple[str, ...] = ("smollm2-135m-instruct",)
    http_host: str = "127.0.0.1"
    http_port: int = 8600
    grpc_port: int = 0  # 0: an ephemeral port
    data_dir: Path = field(default_factory=default_data_dir)
    name: str = ""
    threads: int | None = None
    ctx_size: int | None = None
    max_queue: int = 16
    mesh_secret: str = ""  # required: there is no public default (node/mesh_secret.py picks one)
    mesh_secret_source: str = "flag"  # where it came from: "token", "file", "flag", "env", "data-dir", "new"
    lan: bool = False  # discover and be reachable on the LAN (also implied by a non-loopback host)
    allow_nodes: tuple[str, ...] = ()  # when given, only these node ids are admitted as members
    mdns: bool = True  # LAN/loopback discovery at all (mDNS + multicast); off: libp2p only
    libp2p_port: int | None = None  # None: libp2p off
    bootstrap: tuple[str, ...] = ()
    records: bool = False  # libp2p finds model holders through DHT records, dials a sample of peers (--records)
    advertise_host: str = ""
    engine: str = "llama.cpp"  # engine for whole models: "llama.cpp" or "torch"
    shards: tuple[str, ...] = ()  # "ALIAS_OR_PATH:START-END" layer ranges run by the torch engine
    offers: tuple[str, ...] = ()  # GGUFs whose layer ranges this node loads when the mesh asks
    memory_budget_bytes: int | None = None
    device: str = "cpu"  # torch device of the torch engine
    weights: str = "quantized"  # torch engine weights: "quantized" (GGUF blocks kept) or "full" (dequantized)
    kv_sessions: int = 4  # KV cache slots (concurrent sequences) of the torch engine
    int4_kernel: str = "auto"  # CUDA int4 weights: "tinygemm" (one stream), "triton" (wide batches), or by kv_sessions
    kv_dtype: str = "16"  # torch engine KV cache: "16" (fp16 on CPU, bf16 on CUDA) or "32" (fp32)
    api_keys: tuple[str, ...] = ()  # bearer keys that may use /v1/* (any model, no rate limit)
    api_keys_file: Path | None = None  # more keys, with model allowlists and limits (docs/security.md)
    api_open: bool = False  # serve /v1/* without keys on a non-loopback address, deliberately
    insecure_data_plane: bool = False  # plaintext gRPC between members (token only): debugging, never default
    metrics: bool = True  # /metrics, /mesh/stats and per-request timing (--no-metrics: off, for comparison)
    unload_idle_s: float = 600.0  # a range loaded on request (LoadShard) and unused this long is unloaded
    unload_check_s: float = 60.0  # how often idle ranges are looked for
    disk_budget_bytes: int | None = None  # most disk the weights cache (<data dir>/weights) may use
    serve_streams: int = 4  # weight transfer: FetchTensors calls served at once (advertised)
    replicas: int = 1  # disjoint chains this node plans when it places an offered model (--replicas)
    # peers drop us this long after our last advert or beat; we send one every quarter of it
    # (discovery/service.py's DEFAULT_REFRESH_S to DEFAULT_TTL_S); tests shorten it to see expiry sooner
    advert_ttl_s: float = DEFAULT_TTL_S
    # a client has this long to send a request's headers, then its body; tests shorten them to see
    # half-sent requests cut off sooner
    header_timeout_s: float = HEADER_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S
    upstreams: tuple[UpstreamConfig, ...] = ()  # OpenAI-compatible servers fronted as engines (--upstream)

    def __post_init__(self) -> None:
        for port_name in ("http_port", "grpc_port"):
            port = getattr(self, port_name)
            if not 0 <= port <= 65535:
                raise ValueError(f"{port_name} must be between 0 and 65535")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")
        if self.ctx_size is not None and self.ctx_size < 64:
            raise ValueError("ctx-size must be >= 64")
        if self.engine not in ("llama.cpp", "torch"):
            raise ValueError("engine must be llama.cpp or torch")
        for shard in self.shards:
            parse_shard_arg(shard)
        if not self.mesh_secret:
            raise ValueError("the mesh secret must not be empty")
        for node_id in self.allow_nodes:
            if len(node_id) != 32 or any(c not in "0123456789abcdef" for c in node_id):
                raise ValueError(f"--allow-node wants a node id (32 lowercase hex characters), got {node_id[:40]!r}")
        if self.libp2p_port is not None and not 0 <= self.libp2p_port <= 65535:
            raise ValueError("libp2p-port must be between 0 and 65535")
        if self.records and self.libp2p_port is None:
            raise ValueError("--records needs libp2p (--libp2p-port or --bootstrap)")
        if self.max_queue < 0:
            raise ValueError("max-queue must be >= 0")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}")
        if self.kv_sessions < 1:
            raise ValueError("kv-sessions must be >= 1")
        if self.int4_kernel not in ("auto", "tinygemm", "triton"):  # engine.linear.INT4_KERNEL_CHOICES (torch-free here)
            raise ValueError("int4-kernel must be auto, tinygemm or triton")
        if self.kv_dtype not in ("16", "32"):
            raise ValueError("kv-dtype must be 16 or 32")
        # gateways reuse a fresh placement for up to 5 s (dataplane/routing/placing.py): unload no sooner
        if self.unload_idle_s < 10 or self.unload_check_s <= 0:
            raise ValueError("unload-idle-s must be >= 10 and unload-check-s > 0")
        if self.disk_budget_bytes is not None and self.disk_budget_bytes < 0:
            raise ValueError("disk-budget must be >= 0")
        if not 1 <= self.serve_streams <= 64:
            raise ValueError("serve-streams must be between 1 and 64")
        if not 1 <= self.replicas <= 8:
            raise ValueError("replicas must be between 1 and 8")
        if not 2 <= self.advert_ttl_s <= 60:  # PeerTable holds an advert at most 60 s
            raise ValueError("advert-ttl-s must be between 2 and 60")
        if not (0 < self.header_timeout_s <= MAX_CLIENT_TIMEOUT_S and 0 < self.body_timeout_s <= MAX_CLIENT_TIMEOUT_S):
            raise ValueError(f"header-timeout-s and body-timeout-s must be > 0 and <= {MAX_CLIENT_TIMEOUT_S:.0f}")
        for key in self.api_keys:
            if not key or len(key) > 256 or not key.isprintable() or any(c.isspace() for c in key):
                raise ValueError("an API key must be 1 to 256 printable characters without spaces")
        if not is_loopback(self.http_host) and not (self.api_keys or self.api_keys_file or self.api_open):
            raise ValueError(
                f"--http-host {self.http_host or '(all addresses)'} serves the API beyond this machine: "
                "give --api-key KEY or --api-keys-file FILE, or --api-open to serve it without keys"
            )


def lan_mode(config: NodeConfig) -> bool:
    """Does this node take part in the LAN? Only when asked: --lan, or a non-loopback host to bind or
    advertise. Otherwise it hears nothing from the LAN and tells it nothing (loopback discovery only)."""
    if config.lan or not is_loopback(config.http_host):
        return True
    return bool(config.advertise_host) and not is_loopback(config.advertise_host)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname (or "" / "0.0.0.0" style wildcards): assume it is reachable


def parse_shard_arg(value: str) -> tuple[str, int, int]:
    """"ALIAS_OR_PATH:START-END" -> (model, start, end); the range is checked against the model later."""
    model, sep, span = value.rpartition(":")
    start, dash, end = span.partition("-")
    if not sep or not dash or not start.isdigit() or not end.isdigit() or int(start) >= int(end):
        raise ValueError(f"--shard wants ALIAS_OR_PATH:START-END with START < END, got {value!r}")
    return model, int(start), int(end)
