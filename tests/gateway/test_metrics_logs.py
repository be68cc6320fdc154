"""A real node's request log line (`--log-format json`) and its load progress bar on a terminal."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import REPO, free_port, stop_proc

from node.load_progress import LoadProgress

MODEL = "smollm2-135m-instruct"


def test_json_logs_carry_one_line_per_request(node_factory):
    node = node_factory("J", "--threads", "1", "--log-format", "json", "--log-level", "INFO")
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 6, "temperature": 0}).encode()
    req = urllib.request.Request(node.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        usage = json.loads(resp.read())["usage"]
    line = None
    deadline = time.monotonic() + 10
    while line is None and time.monotonic() < deadline:
        for raw in (node.proc.stdout.readline() or "",):
            if '"logger": "meshllm.request"' in raw:
                line = json.loads(raw)
        time.sleep(0.05)
    assert line is not None, "no request line logged"
    assert line["level"] == "INFO" and line["request_id"].startswith("cmpl-")
    assert (line["model"], line["route"], line["served_by"], line["status"]) == (MODEL, "local", "J", "200")
    assert line["prompt_tokens"] == usage["prompt_tokens"] and line["completion_tokens"] == usage["completion_tokens"]
    assert 0 < line["ttft_ms"] <= line["total_ms"]
    for earlier in node.output:  # every line the node wrote before is JSON too (its ready line is ours)
        if not earlier.startswith("meshllm node ") and earlier.strip():
            json.loads(earlier)


def test_a_terminal_sees_a_progress_bar_for_the_load(tmp_path):
    """stdout a pseudo-terminal, as a user's shell gives it: the load draws a tqdm bar."""
    master, slave = pty.openpty()
    cmd = [sys.executable, "-m", "node.cli", "node", "join", "--http-port", str(free_port()), "--threads", "1",
           "--data-dir", str(tmp_path), "--name", "T", "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=slave, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 90
        while b" ready at " not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    seen += os.read(master, 65536)
                except OSError:
                    break
    finally:
        stop_proc(proc)
        os.close(master)
    text = seen.decode(errors="replace")
    assert " ready at " in text, text
    assert f"loading {MODEL}" in text and "100%" in text and "loaded" in text


@pytest.mark.parametrize("fail", [False, True])
def test_load_progress_snapshot(fail):
    progress = LoadProgress(bars=False)
    with pytest.raises(RuntimeError) if fail else contextlib.nullcontext():
        with progress.track("m layers 0-5", 1000):
            assert progress.loading and progress.snapshot()[0]["state"] == "loading"
            if fail:
                raise RuntimeError("bad tensor")
    (load,) = progress.snapshot()
    assert not progress.loading
    assert (load["state"], load["fraction"]) == (("failed", load["fraction"]) if fail else ("loaded", 1.0))
