"""`meshllm models`: the models in a data dir's weights cache (what a node fetched or pulled)."""

from __future__ import annotations

import json
from pathlib import Path

from shard.manifest import n_layers_of
from shard.weight_cache import WeightCache


def print_models(data_dir: Path, *, as_json: bool = False) -> int:
    rows: list[dict] = []
    for e in sorted(WeightCache(data_dir).load(), key=lambda e: e.alias or e.digest):
        n = n_layers_of(e.manifest.segments)
        rows.append({"alias": e.alias, "digest": e.digest, "n_layers": n, "complete": e.complete,
                     "ranges": [list(r) for r in e.ranges], "file_bytes": e.manifest.file_size,
                     "disk_bytes": e.disk_bytes(), "path": str(e.path)})
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no models in {Path(data_dir) / 'weights'}")
        return 0
    print(f"{'MODEL':<32} {'DIGEST':<14} {'HELD':<14} {'ON DISK':>10}")
    for r in rows:
        held = "whole" if r["complete"] else ",".join(f"{a}-{b}" for a, b in r["ranges"]) or "partial"
        print(f"{(r['alias'] or '-')[:32]:<32} {r['digest'][:12]:<14} {held:<14} {r['disk_bytes'] / 2**20:>8.1f} MiB")
    return 0
