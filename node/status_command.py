"""`meshllm status`: one screen about a node: itself, its peers, the mesh's models and where they run,
what is loading, and recent speed. Everything a peer advertised is printed terminal-safe by the caller
(`node/cli.py` wraps stdout)."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

from node.peers_command import format_table


class StatusError(Exception):
    pass


def _get(url: str, path: str, api_key: str | None) -> object:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url.rstrip("/") + path, headers=headers), timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise StatusError(f"{path}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise StatusError(f"cannot read {path} from {url}: {getattr(e, 'reason', e)}") from None


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def _models_of(advert: dict) -> str:
    return ", ".join(m["alias"] if m["whole"] else f"{m['alias']} layers {m['start']}-{m['end']}"
                     for m in advert.get("models", ())) or "none"


def format_status(me: dict, peers: list[dict], models: list[dict] | None, stats: dict | None) -> str:
    r, load = me["resources"], me["load"]
    memory = (f"VRAM {_gib(r['vram_free_bytes'])} free of {_gib(r['vram_total_bytes'])}, " if r["vram_total_bytes"]
              else "") + f"RAM {_gib(r['ram_free_bytes'])} free of {_gib(r['ram_total_bytes'])}"
    lines = [
        f"node     {me['name']} ({me['node_id']}) version {me['version']}",
        f"device   {r['device']}; {memory}",
        f"serves   {_models_of(me)}",
        f"load     {load['active']} active, {load['queued']} queued, capacity {load['capacity']}",
    ]
    loading = [x for x in me.get("loading", ()) if x["state"] != "loaded"]
    for x in loading:
        lines.append(f"loading  {x['what']}: {x['state']} {100 * x['fraction']:.0f}% of {_gib(x['total_bytes'])}"
                     f" ({x['seconds']:.0f} s)")
    if not loading:
        lines.append("loading  nothing")
    lines += ["", f"peers ({len(peers)})", format_table(peers) if peers else "no peers", ""]
    if models is None:
        lines.append("models   (this node wants an API key for /v1/models: give --api-key)")
    else:
        lines.append(f"models ({len(models)})")
        per_model = (stats or {}).get("models", {})
        for m in models:
            nodes = m.get("meshllm", {}).get("nodes", [])
            live = per_model.get(m["id"])
            speed = (f"   recent: {live['decode_tok_s_p50']:.1f} tok/s, TTFT {live['ttft_ms_p50']:.0f} ms"
                     if live else "")
            lines.append(f"  {m['id']}: {_route_of(m['id'], nodes, [me, *peers])}{speed}")
        if not models:
            lines.append("  none")
    return "\n".join(lines)


def _route_of(alias: str, nodes: list[str], adverts: list[dict]) -> str:
    """Whole holders, or the chain of layer ranges: "pipeline a[0-15] -> b[15-30]"."""
    ranges: dict[str, str] = {}
    whole: set[str] = set()
    for advert in adverts:
        for m in advert.get("models", ()):
            if m["alias"] == alias:
                if m["whole"]:
                    whole.add(advert["name"])
                else:
                    ranges[advert["name"]] = f"{m['start']}-{m['end']}"
    if nodes and all(n in whole for n in nodes):
        return "held whole by " + ", ".join(nodes)
    if nodes:
        return "pipeline " + " -> ".join(f"{n}[{ranges.get(n, '?')}]" for n in nodes)
    return "offered (loads on first use)"


def print_status(url: str, *, api_key: str | None = None, as_json: bool = False) -> int:
    try:
        me = _get(url, "/mesh/self", None)
        peers = _get(url, "/mesh/peers", None)
    except StatusError as e:
        print(f"meshllm: error: {e}", file=sys.stderr)
        return 1
    models: list[dict] | None
    stats: dict | None
    try:
        listing = _get(url, "/v1/models", api_key)
        models = list(listing["data"]) if isinstance(listing, dict) else []
    except StatusError:
        models = None
    try:
        got = _get(url, "/mesh/stats", api_key)
        stats = got if isinstance(got, dict) else None
    except StatusError:
        stats = None  # --no-metrics, or a key wanted
    if not isinstance(me, dict) or not isinstance(peers, list):
        print(f"meshllm: error: {url} did not answer as a meshllm node", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps({"self": me, "peers": peers, "models": models, "stats": stats}, indent=2))
        return 0
    try:
        print(format_status(me, peers, models, stats))
    except (KeyError, TypeError) as e:
        print(f"meshllm: error: {url} answered in a shape this version does not know: {e!r}", file=sys.stderr)
        return 1
    return 0
