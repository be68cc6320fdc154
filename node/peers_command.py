"""`meshllm peers`: what a node sees of the mesh, as a table or JSON."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f}G"


def format_table(peers: list[dict]) -> str:
    header = ("NAME", "NODE", "MODELS", "LOAD", "RAM FREE", "VRAM FREE", "TOK/S", "ADDRESS", "SEEN")
    rows = [header]
    for p in peers:
        models = ",".join(
            m["alias"] if m["whole"] else f"{m['alias']}[{m['start']}:{m['end']}]" for m in p["models"]
        ) or "-"
        load = p["load"]
        rows.append((
            p["name"],
            p["node_id"][:12],
            models,
            f"{load['active']}+{load['queued']}/{load['capacity']}",
            _gib(p["resources"]["ram_free_bytes"]),
            _gib(p["resources"]["vram_free_bytes"]) if p["resources"]["vram_total_bytes"] else "-",
            f"{p['resources']['speed_tok_s']:.0f}",
            p["addresses"]["http"],
            f"{p['last_seen_s']:.1f}s",
        ))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def print_peers(url: str, *, as_json: bool) -> int:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/mesh/peers", timeout=10) as resp:
            peers = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"meshllm: error: cannot read peers from {url}: {e}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(peers, indent=2))
    elif not peers:
        print("no peers")
    else:
        print(format_table(peers))
    return 0
