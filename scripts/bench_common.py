"""What the benchmark scripts share: starting real node processes and timing streamed completions."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
PROMPT = "Once upon a time, in a small village by the sea, there lived"
# --data-plane: the node flags of each data plane; "both" runs the two meshes side by side, alternating
DATA_PLANE_FLAGS = {"mtls": (), "insecure": ("--insecure-data-plane",)}
DATA_PLANE_CHOICES = ("mtls", "insecure", "both")


def data_planes(choice: str) -> list[str]:
    return list(DATA_PLANE_FLAGS) if choice == "both" else [choice]


def start_node(name: str, port: int, data_dir: str, *extra: str, subdir: str = "") -> subprocess.Popen:
    """`meshllm node join` in its own data dir (data_dir/subdir, default data_dir/name); returns once
    its ready line is printed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "node", "join", "--http-port", str(port), "--data-dir",
         f"{data_dir}/{subdir or name}", "--name", name, "--log-level", "WARNING", *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    for line in proc.stdout:
        if " ready at " in line:
            return proc
    raise RuntimeError(f"{name} did not start")


def stop_nodes(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait()


def stream_completion(
    url: str, tokens: int, prompt: str = PROMPT, model: str = MODEL
) -> tuple[float, float, int, str]:
    """Greedy streamed completion: (TTFT s, total s, completion tokens, serving node)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    ttft, n = None, 0
    with urllib.request.urlopen(req, timeout=600) as resp:
        served_by = resp.headers["X-Meshllm-Node"]
        for line in resp:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                n = event["usage"]["completion_tokens"]
            elif ttft is None and event["choices"] and event["choices"][0]["text"]:
                ttft = time.perf_counter() - start
    total = time.perf_counter() - start
    return ttft or total, total, n, served_by
