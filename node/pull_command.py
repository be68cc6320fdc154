"""`meshllm pull MODEL`: a node fetches a whole model from the mesh into its cache; a progress bar here.

The node at `--url` does the fetching (it is the member, with the mesh's certificates); this command
asks it (`POST /mesh/pull`) and draws its progress (`GET /mesh/pull`): bytes, rate, ETA and sources.
With `--data-dir`, the finished file is also placed in that data dir's cache (a hard link when it can).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

POLL_S = 0.25


def _call(url: str, api_key: str | None, body: dict | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read())
        except ValueError:
            return e.code, {"error": e.reason}


def run_pull(url: str, model: str, *, api_key: str | None = None, data_dir: Path | None = None) -> int:
    base = url.rstrip("/")
    status, state = _call(base + "/mesh/pull", api_key, {"model": model})
    if status != 202:
        print(f"meshllm: error: {state.get('error', status)}", file=sys.stderr)
        return 1
    digest, alias = state["digest"], state["alias"]
    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=f"pull {alias}"[:40],
               file=sys.stderr, disable=None, dynamic_ncols=True)
    try:
        while state.get("state") == "running":
            time.sleep(POLL_S)
            status, state = _call(f"{base}/mesh/pull?model={urllib.parse.quote(digest)}", api_key)
            if status != 200:
                print(f"meshllm: error: {state.get('error', status)}", file=sys.stderr)
                return 1
            p = state.get("progress")
            if p:
                if bar.total != p["total_bytes"]:
                    bar.reset(total=p["total_bytes"])
                bar.n = p["done_bytes"]
                bar.set_postfix_str(f"{len(p['sources'])} source(s)")
                bar.refresh()
        if state.get("state") == "done":
            bar.n = bar.total or bar.n
            bar.refresh()
    finally:
        bar.close()
    if state.get("state") != "done":
        print(f"meshllm: error: {state.get('error', 'the pull failed')}", file=sys.stderr)
        return 1
    path = Path(state["path"])
    if data_dir is not None:
        path = _place(path, Path(data_dir) / "weights", digest)
    fetched = state.get("bytes", 0)
    print(f"pulled {alias} ({digest[:12]}): {fetched / 2**20:.1f} MiB fetched from "
          f"{len(state.get('sources', []))} source(s) in {state.get('seconds', 0):.1f} s -> {path}")
    return 0


def _place(path: Path, dest_dir: Path, digest: str) -> Path:
    """The pulled file (and its manifest and state) in another data dir's cache."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    for ext in (".gguf", ".manifest", ".json"):
        src, dst = path.with_suffix(ext), dest_dir / f"{digest}{ext}"
        if not src.exists() or (dst.exists() and os.path.samefile(src, dst)):
            continue
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    return dest_dir / f"{digest}.gguf"
