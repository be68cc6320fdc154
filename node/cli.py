"""The `meshllm` command line: `meshllm node join ...`, `meshllm peers`, `meshllm status`, `meshllm chat`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from discovery.join_token import MAX_BOOTSTRAP, JoinToken, encode_token, is_bootstrap_addr
from discovery.service import DEFAULT_TTL_S
from engine.model_file import DEFAULT_ALIAS, ModelFileError
from engine.types import EngineLoadError
from engine.upstream import UpstreamConfig
from gateway.app import BODY_TIMEOUT_S, HEADER_TIMEOUT_S
from node.config import WEIGHTS, NodeConfig, default_data_dir, lan_mode
from node.log_format import LOG_FORMATS, setup_logging
from node.mesh_secret import MeshSecret, resolve_secret
from node.peers_command import print_peers
from node.terminal import TerminalSafe, terminal_safe

__all__ = ["build_parser", "main", "terminal_safe"]

log = logging.getLogger("meshllm")


def _join_parser(sub: argparse._SubParsersAction) -> None:
    join = sub.add_parser("join", help="start a node and join the mesh")
    join.add_argument(
        "--model",
        action="append",
        metavar="ALIAS_OR_PATH",
        help=f"a model to serve (repeatable); default: {DEFAULT_ALIAS}",
    )
    join.add_argument("--no-model", action="store_true", help="serve no model (a gateway-only node)")
    join.add_argument("--http-host", default="127.0.0.1")
    join.add_argument("--http-port", type=int, default=8600)
    join.add_argument("--grpc-port", type=int, default=0, help="0: any free port")
    join.add_argument("--data-dir", type=Path, default=None, help=f"default: {default_data_dir()}")
    join.add_argument("--name", default="", help="default: hostname and a piece of the node id")
    join.add_argument("--threads", type=int, default=None, help="CPU threads per engine")
    join.add_argument("--ctx-size", type=int, default=None, help="context window (default: the model's)")
    join.add_argument("--max-queue", type=int, default=16, help="requests waiting per model before 429")
    join.add_argument("--lan", action="store_true",
                      help="discover and be reachable on the LAN (default: loopback only); prints a join token")
    join.add_argument("--token", default=None, help="join the mesh of the node that printed this token (implies --lan)")
    join.add_argument("--mesh-secret", default=None, help="shared by every node of one mesh (or MESHLLM_MESH_SECRET)")
    join.add_argument("--mesh-secret-file", type=Path, default=None, help="read the mesh secret from a file")
    join.add_argument("--allow-node", action="append", default=[], metavar="NODE_ID",
                      help="admit only these node ids as members (repeatable)")
    join.add_argument("--no-mdns", action="store_true",
                      help="no LAN or loopback discovery (mDNS, multicast): libp2p only")
    join.add_argument("--libp2p-port", type=int, default=None, help="run the libp2p host (DHT + gossipsub) on this port")
    join.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                      help="a libp2p peer to join through (repeatable; turns libp2p on)")
    join.add_argument("--records", action="store_true",
                      help="past one LAN: find model holders through model-keyed DHT records and dial only a "
                           "sample of peers, instead of learning every peer by gossip (turns libp2p on)")
    join.add_argument("--advertise-host", default="", help="the address peers should use to reach this node")
    join.add_argument("--engine", choices=("llama.cpp", "torch"), default="llama.cpp",
                      help="engine for whole models (torch: the reference engine, also used for shards)")
    join.add_argument("--shard", action="append", default=[], metavar="ALIAS_OR_PATH:START-END",
                      help="run layers [START, END) of a model with the torch engine (repeatable)")
    join.add_argument("--offer", action="append", default=[], metavar="ALIAS_OR_PATH",
                      help="offer a model's layers: load the range the mesh's planner assigns, on demand")
    join.add_argument("--memory-budget", type=int, default=None, metavar="BYTES",
                      help="most memory this node may use for model weights and KV cache")
    join.add_argument("--device", default="cpu", help="torch device for the torch engine (cpu, cuda)")
    join.add_argument("--weights", choices=WEIGHTS, default="quantized",
                      help="torch engine weights: keep the GGUF's quantized blocks, or dequantize them in full")
    join.add_argument("--kv-dtype", choices=("16", "32"), default="16",
                      help="torch engine KV cache: 16-bit (fp16 on CPU, bf16 on CUDA) or fp32")
    join.add_argument("--int4-kernel", choices=("auto", "tinygemm", "triton"), default="auto",
                      help="CUDA, quantized weights: tinygemm (torch's kernel), triton (our kernels; on Hopper "
                           "the Gluon one: per matrix 0.9-1.3x tinygemm at one row, 1.7-14x from 8 rows; MESHLLM_GLUON=0 "
                           "turns it off), auto: triton on Hopper or later (kernel launches overlap) or when "
                           "--kv-sessions >= 8, else tinygemm")
    join.add_argument("--kv-sessions", type=int, default=4, metavar="N",
                      help="torch engine: KV memory for N full-context sequences, shared by up to 4N "
                           "concurrent shorter ones (paged)")
    join.add_argument("--api-key", action="append", default=[], metavar="KEY",
                      help="a bearer key that may use /v1/* (repeatable; or MESHLLM_API_KEY)")
    join.add_argument("--api-keys-file", type=Path, default=None, metavar="FILE",
                      help="API keys with per-key model allowlists and rate limits (see docs/security.md)")
    join.add_argument("--api-open", action="store_true",
                      help="serve /v1/* without keys even on a non-loopback --http-host")
    join.add_argument("--insecure-data-plane", action="store_true",
                      help="plaintext gRPC between members, the mesh token only (debugging; default: mTLS)")
    join.add_argument("--unload-idle-s", type=float, default=600.0, metavar="S",
                      help="unload a range the mesh made this node load (LoadShard) once unused this long")
    join.add_argument("--unload-check-s", type=float, default=60.0, metavar="S",
                      help="how often to look for such idle ranges")
    join.add_argument("--disk-budget", type=int, default=None, metavar="BYTES",
                      help="most disk the cache of weights fetched from the mesh may use (<data dir>/weights)")
    join.add_argument("--serve-streams", type=int, default=4, metavar="N",
                      help="weight transfers this node serves to members at once")
    join.add_argument("--replicas", type=int, default=1, metavar="N",
                      help="when this node places an offered model, load N disjoint chains if memory allows "
                           "(requests spread over them; a failed node's streams move to another)")
    join.add_argument("--advert-ttl-s", type=float, default=DEFAULT_TTL_S, metavar="S",
                      help="peers drop this node S seconds after its last advert or heartbeat (one every S/4)")
    join.add_argument("--header-timeout-s", type=float, default=HEADER_TIMEOUT_S, metavar="S",
                      help="an API client has S seconds to send a request's headers (and an idle connection lives S)")
    join.add_argument("--body-timeout-s", type=float, default=BODY_TIMEOUT_S, metavar="S",
                      help="then S seconds to send its body (else 408)")
    join.add_argument("--no-metrics", action="store_true",
                      help="no /metrics, /mesh/stats or per-request timing (to measure what they cost)")
    join.add_argument("--upstream", action="append", default=[], metavar="URL",
                      help="front an OpenAI-compatible server (vLLM, SGLang, llama-server, Ollama): its models "
                           "join the mesh (repeatable; docs/upstream.md)")
    join.add_argument("--upstream-key", action="append", default=[], metavar="KEY",
                      help="its API key: one for every --upstream, or one per --upstream in order")
    join.add_argument("--upstream-model", action="append", default=[], metavar="NAME",
                      help="advertise only these served names (repeatable; default: all it lists)")
    join.add_argument("--upstream-concurrency", type=int, default=8, metavar="N",
                      help="generations in flight at each upstream, at most")
    join.add_argument("--upstream-timeout-s", type=float, default=120.0, metavar="S",
                      help="longest silence of an upstream before its first token or between chunks")
    join.add_argument("--log-level", default="INFO")
    join.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                      help="json: one JSON object a line (requests carry their fields: id, model, route, timings)")


def _peers_parser(commands: argparse._SubParsersAction) -> None:
    peers = commands.add_parser("peers", help="list the peers a node sees")
    peers.add_argument("--url", default="http://127.0.0.1:8600", help="the node to ask")
    peers.add_argument("--json", action="store_true", help="print JSON instead of a table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshllm", description="A peer-to-peer LLM inference mesh.")
    commands = parser.add_subparsers(dest="command", required=True)
    node = commands.add_parser("node", help="run a node")
    node_sub = node.add_subparsers(dest="node_command", required=True)
    _join_parser(node_sub)
    _peers_parser(commands)
    _status_parser(commands)
    _chat_parser(commands)
    _weights_parsers(commands)
    return parser


def _weights_parsers(commands: argparse._SubParsersAction) -> None:
    pull = commands.add_parser("pull", help="fetch a whole model from the mesh into a node's cache")
    pull.add_argument("model", help="alias, digest or digest prefix of a model the mesh has")
    pull.add_argument("--url", default="http://127.0.0.1:8600", help="the node that fetches (and keeps) it")
    pull.add_argument("--data-dir", type=Path, default=None, help="also place the file in this data dir's cache")
    pull.add_argument("--api-key", default=None, help="for a node with API keys (or MESHLLM_API_KEY)")
    models = commands.add_parser("models", help="list the models in a data dir's cache")
    models.add_argument("--data-dir", type=Path, default=None, help=f"default: {default_data_dir()}")
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _status_parser(commands: argparse._SubParsersAction) -> None:
    status = commands.add_parser("status", help="one screen: this node, its peers, models and routes, loads")
    status.add_argument("--url", default="http://127.0.0.1:8600", help="the node to ask")
    status.add_argument("--api-key", default=None, help="for a node with API keys (or MESHLLM_API_KEY)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a screen")


def _chat_parser(commands: argparse._SubParsersAction) -> None:
    chat = commands.add_parser("chat", help="chat with a model of the mesh (one prompt, or a conversation)")
    chat.add_argument("model", nargs="?", default=None, help="default: the first model the node lists")
    chat.add_argument("prompt", nargs="?", default=None, help="answer this one prompt and exit (for scripts)")
    chat.add_argument("--url", default="http://127.0.0.1:8600", help="the node to talk to")
    chat.add_argument("--api-key", default=None, help="for a node with API keys (or MESHLLM_API_KEY)")
    chat.add_argument("--system", default=None, help="a system message")
    chat.add_argument("--max-tokens", type=int, default=None)
    chat.add_argument("--temperature", type=float, default=None)


def _mesh_secret(args: argparse.Namespace, data_dir: Path) -> MeshSecret:
    return resolve_secret(
        data_dir,
        token=args.token,
        secret=args.mesh_secret,
        secret_file=args.mesh_secret_file,
        env=os.environ.get("MESHLLM_MESH_SECRET"),
    )


def _config(args: argparse.Namespace) -> NodeConfig:
    explicit = args.shard or args.offer or args.upstream
    models: tuple[str, ...] = () if args.no_model or (explicit and not args.model) else tuple(args.model or (DEFAULT_ALIAS,))
    data_dir = args.data_dir or default_data_dir()
    secret = _mesh_secret(args, data_dir)
    bootstrap = tuple(dict.fromkeys([*args.bootstrap, *secret.bootstrap]))
    libp2p_port = args.libp2p_port
    if libp2p_port is None and (bootstrap or args.records):
        libp2p_port = 0
    return NodeConfig(
        models=models,
        http_host=args.http_host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        data_dir=data_dir,
        name=args.name,
        threads=args.threads,
        ctx_size=args.ctx_size,
        max_queue=args.max_queue,
        mesh_secret=secret.secret,
        mesh_secret_source=secret.source,
        lan=args.lan or args.token is not None,
        allow_nodes=tuple(args.allow_node),
        mdns=not args.no_mdns,
        libp2p_port=libp2p_port,
        bootstrap=bootstrap,
        records=args.records,
        advertise_host=args.advertise_host,
        engine=args.engine,
        shards=tuple(args.shard),
        offers=tuple(args.offer),
        memory_budget_bytes=args.memory_budget,
        device=args.device,
        weights=args.weights,
        kv_sessions=args.kv_sessions,
        int4_kernel=args.int4_kernel,
        kv_dtype=args.kv_dtype,
        api_keys=tuple(args.api_key) + ((os.environ["MESHLLM_API_KEY"],) if os.environ.get("MESHLLM_API_KEY") else ()),
        api_keys_file=args.api_keys_file,
        insecure_data_plane=args.insecure_data_plane,
        api_open=args.api_open,
        metrics=not args.no_metrics,
        upstreams=_upstreams(args),
        unload_idle_s=args.unload_idle_s,
        unload_check_s=args.unload_check_s,
        disk_budget_bytes=args.disk_budget,
        serve_streams=args.serve_streams,
        replicas=args.replicas,
        advert_ttl_s=args.advert_ttl_s,
        header_timeout_s=args.header_timeout_s,
        body_timeout_s=args.body_timeout_s,
    )


def _upstreams(args: argparse.Namespace) -> tuple[UpstreamConfig, ...]:
    keys = list(args.upstream_key)
    if len(keys) not in (0, 1, len(args.upstream)):
        raise ValueError("give one --upstream-key for every --upstream, or one per --upstream in order")
    return tuple(
        UpstreamConfig(url, api_key=keys[i] if len(keys) == len(args.upstream) else (keys[0] if keys else ""),
                       models=tuple(args.upstream_model), concurrency=args.upstream_concurrency,
                       read_timeout_s=args.upstream_timeout_s)
        for i, url in enumerate(args.upstream)
    )


async def _run_node(config: NodeConfig) -> None:
    from node.daemon import Node  # heavy imports (llama.cpp) only for the commands that need them

    node = Node(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.start()
        models = ", ".join(lm.model.alias for lm in node.local.all()) or "no model"
        # Tests and scripts wait for this line.
        print(f"meshllm node {node.name} ({node.node_id}) ready at {node.http_url} serving {models}", flush=True)
        if lan_mode(config) and config.mesh_secret_source in ("new", "data-dir", "token"):
            boot = tuple(a for a in node.discovery.libp2p_addrs if is_bootstrap_addr(a))[:MAX_BOOTSTRAP]
            token = encode_token(JoinToken(config.mesh_secret, boot))
            # the token carries the mesh secret: whoever has it is a member
            print(f"to join this mesh from another machine, run there:\n  meshllm node join --token {token}", flush=True)
        await stop.wait()
        log.info("shutting down")
    finally:
        await node.stop()


def _api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get("MESHLLM_API_KEY") or None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "log_level", "INFO"), getattr(args, "log_format", "text"))
    try:
        if args.command == "node" and args.node_command == "join":
            asyncio.run(_run_node(_config(args)))
        elif args.command == "peers":
            with contextlib.redirect_stdout(TerminalSafe(sys.stdout)):
                return print_peers(args.url, as_json=args.json)
        elif args.command == "status":
            from node.status_command import print_status

            with contextlib.redirect_stdout(TerminalSafe(sys.stdout)):
                return print_status(args.url, api_key=_api_key(args), as_json=args.json)
        elif args.command == "chat":
            from node.chat_command import run_chat

            params = {k: v for k, v in (("max_tokens", args.max_tokens), ("temperature", args.temperature))
                      if v is not None}
            return run_chat(args.url, args.model, args.prompt, api_key=_api_key(args), system=args.system,
                            params=params)
        elif args.command == "pull":
            from node.pull_command import run_pull

            return run_pull(args.url, args.model, api_key=_api_key(args), data_dir=args.data_dir)
        elif args.command == "models":
            from node.models_command import print_models

            with contextlib.redirect_stdout(TerminalSafe(sys.stdout)):
                return print_models(args.data_dir or default_data_dir(), as_json=args.json)
    except (ModelFileError, EngineLoadError, ValueError) as e:
        print(f"meshllm: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"meshllm: error: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
