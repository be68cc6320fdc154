"""The dashboard at / of a live 3-node mesh with one pipeline chain (G, a gateway with an API key and no
layers; S1 and S2, the two layer ranges of SmolLM2), checked in a real headless Chromium driven over
the DevTools protocol, and through the JSON it polls. S2's name is markup: it must show as text."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from conftest import REPO, stop_proc

MODEL = "smollm2-135m-instruct"
KEY = "sk-dash-" + secrets.token_hex(4)
S2 = 'S2<img src=x id="pwn">'
ARTIFACTS = Path(os.environ.get("MESHLLM_TEST_ARTIFACTS", REPO / "build" / "test-artifacts"))


def get(url: str, key: str | None = None) -> tuple[int, dict, bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def mesh(module_node_factory):
    secret = "dash-" + secrets.token_hex(4)
    one = ("--threads", "1", "--mesh-secret", secret)
    # the page's chat sends no max_tokens and samples: a 512-token context bounds an answer that never
    # says EOS to ~40 s at this box's pipeline speed (the model's own 8,192 ran past the 120 s wait)
    stage = ("--ctx-size", "512", *one)
    started = module_node_factory.many({
        "G": ("--no-model", "--api-key", KEY, *one),
        "S1": ("--shard", f"{MODEL}:0-15", *stage),
        S2: ("--shard", f"{MODEL}:15-30", *stage),
    })
    nodes = {"G": started["G"], "S1": started["S1"], "S2": started[S2]}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _, _, body = get(nodes["G"].url + "/v1/models", KEY)
        models = json.loads(body)["data"]
        if models and models[0]["meshllm"]["nodes"] == ["S1", S2]:
            return nodes
        time.sleep(0.3)
    raise AssertionError("G never listed the S1+S2 pipeline")


def test_the_page_and_its_files_are_served_with_a_strict_policy(mesh):
    status, headers, body = get(mesh["G"].url + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'<script src="/dashboard/dashboard.js"' in body and b"http" not in body.lower().replace(b"http-equiv", b"")
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
    for name in ("dashboard.js", "dashboard.css"):
        assert get(mesh["G"].url + "/dashboard/" + name)[0] == 200
    for name in ("index.html", "..%2Fapp.py", "nope.js"):
        assert get(mesh["G"].url + "/dashboard/" + name)[0] == 404
    js = get(mesh["G"].url + "/dashboard/dashboard.js")[2].decode()
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "eval(" not in js


def test_the_json_the_page_polls_describes_the_mesh(mesh):
    g = mesh["G"].url
    me = json.loads(get(g + "/mesh/self")[2])
    peers = json.loads(get(g + "/mesh/peers")[2])
    assert me["name"] == "G" and me["loading"] == []
    assert sorted(p["name"] for p in peers) == sorted(["S1", S2])
    s1 = json.loads(get(mesh["S1"].url + "/mesh/self")[2])
    assert [(x["what"], x["state"], x["fraction"]) for x in s1["loading"]] == [(f"{MODEL} layers 0-15", "loaded", 1.0)]
    assert get(g + "/mesh/stats")[0] == 401 and get(g + "/mesh/stats", KEY)[0] == 200


def test_a_pipeline_request_shows_in_metrics_at_every_node(mesh):
    g = mesh["G"].url
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time, in a small village", "max_tokens": 8,
                       "temperature": 0}).encode()
    req = urllib.request.Request(g + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.headers["X-Meshllm-Node"] == f"S1+{S2}"
    from prometheus_client.parser import text_string_to_metric_families

    def samples(url: str, key: str | None = None) -> list:
        text = get(url + "/metrics", key)[2].decode()
        return [s for f in text_string_to_metric_families(text) for s in f.samples]

    assert any(s.name == "meshllm_requests_total" and s.labels["route"] == "pipeline" and s.value >= 1
               for s in samples(g, KEY))
    for name, layers in (("S1", "0-15"), ("S2", "15-30")):
        steps = [s for s in samples(mesh[name].url) if s.name == "meshllm_pipeline_step_seconds_count"]
        assert {(s.labels["layers"], s.labels["phase"]) for s in steps if s.value > 0} == {
            (layers, "prefill"), (layers, "decode")}


# --- the browser -------------------------------------------------------------------------------------

def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Page:
    """A page of a headless Chromium, over the DevTools protocol (one websocket, numbered commands)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._next = 0

    async def send(self, method: str, **params: object) -> dict:
        self._next += 1
        await self._ws.send_json({"id": self._next, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self._ws.receive_json(), 30)
            if msg.get("id") == self._next:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg["result"]

    async def js(self, expression: str) -> object:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 30) -> object:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = await self.js(expression)
            if value:
                return value
            await asyncio.sleep(0.2)
        raise AssertionError(f"never true: {expression}\npage: {await self.js('document.body.innerText')}")


def _start_chromium(binary: str, profile: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
         "--window-size=1400,1000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if m := re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line):
            return proc, int(m.group(1))
        if not line and proc.poll() is not None:
            break
    stop_proc(proc)
    raise AssertionError("chromium did not start its DevTools server")


async def _drive(page_url: str, devtools_port: int) -> tuple[dict, bytes]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{devtools_port}/json/list") as resp:
            targets = await resp.json()
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        async with http.ws_connect(ws_url, max_msg_size=64 << 20) as ws:
            page = Page(ws)
            await page.send("Page.enable")
            await page.send("Runtime.enable")
            await page.send("Page.navigate", url=page_url)
            # without the key: the nodes show (from /mesh/*), models and stats ask for the key
            await page.wait_for("document.querySelectorAll('#nodes tbody tr').length === 3")
            await page.wait_for("document.getElementById('status').textContent.includes('API key')")
            # the key, typed into its field and saved (kept in localStorage)
            await page.js("document.getElementById('key').focus()")
            await page.send("Input.insertText", text=KEY)
            await page.js("document.getElementById('save-key').click()")
            chain = f"S1 [0-15) \u2192 {S2} [15-30)"
            await page.wait_for(f"document.getElementById('models').textContent.includes({json.dumps(chain)})")
            # chat through the page; its answer streams into the log
            await page.js("document.getElementById('chat-input').value = 'Say hello.'")
            await page.js("document.getElementById('chat-send').click()")
            await page.wait_for("document.querySelector('#chat-log .assistant')?.dataset.done === 'true'", 120)
            await page.wait_for("document.getElementById('live').textContent.includes('pipeline')")
            found = await page.js("""(() => ({
                names: [...document.querySelectorAll('#nodes tbody td.name')].map(td => td.textContent),
                models: document.getElementById('models').textContent,
                answer: document.querySelector('#chat-log .assistant').textContent,
                live: document.getElementById('live').textContent,
                pwned: document.getElementById('pwn') !== null || document.querySelectorAll('img').length > 0,
                stored: localStorage.getItem('meshllm_api_key'),
            }))()""")
            png = await page.send("Page.captureScreenshot", format="png")
            assert isinstance(found, dict)
            return found, base64.b64decode(png["data"])


def test_the_dashboard_in_a_real_browser(mesh):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium on this machine (scripts/setup.sh installs Debian's chromium package)")
    profile = tempfile.mkdtemp(prefix="meshllm-chromium-")
    proc, port = _start_chromium(binary, profile)
    shot = ARTIFACTS / "dashboard.png"
    try:
        found, png = asyncio.run(_drive(mesh["G"].url + "/", port))
    finally:
        stop_proc(proc)
        shutil.rmtree(profile, ignore_errors=True)
    shot.parent.mkdir(parents=True, exist_ok=True)
    shot.write_bytes(png)  # a test artifact: what the page looked like
    assert sorted(found["names"]) == sorted(["G", "S1", S2])
    assert f"S1 [0-15) \u2192 {S2} [15-30)" in found["models"]
    assert found["answer"].strip()
    assert not found["pwned"], "a peer's name became markup"
    assert found["stored"] == KEY
    assert "smollm2-135m-instruct: " in found["live"] and "pipeline" in found["live"]
    assert shot.stat().st_size > 10_000
