"""API keys on /v1/*: the gateway app served on a real socket in a thread, over a fake backend."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from core.serving import Embeddings, ModelListing
from gateway import build_app
from gateway.api_keys import ApiKeys, parse_key_line

MODELS = [ModelListing("alpha", "a" * 64, 30, 2048, ("n1",)), ModelListing("beta", "b" * 64, 30, 2048, ("n1",))]


class FakeBackend:
    node_name = "fake"

    def list_models(self) -> list[ModelListing]:
        return MODELS

    async def open_generation(self, model, request):  # pragma: no cover - not reached here
        raise NotImplementedError

    async def embed(self, model: str, texts: list[str]) -> Embeddings:
        return Embeddings("fake", [[1.0, 0.0] for _ in texts], len(texts))

    def describe_self(self) -> dict:
        return {}


class Served:
    def __init__(self, app: web.Application) -> None:
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def serve() -> Iterator:
    started: list[Served] = []

    def make(**kwargs) -> Served:
        s = Served(build_app(FakeBackend(), **kwargs))
        started.append(s)
        return s

    yield make
    for s in started:
        s.close()


def call(server: Served, path: str, key: str | None = None, body: dict | None = None) -> tuple[int, dict, dict]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(server.url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def embed_body(model: str) -> dict:
    return {"model": model, "input": "x"}


def test_no_keys_means_open(serve):
    s = serve()
    assert call(s, "/v1/models")[0] == 200


@pytest.mark.parametrize("presented", [None, "", "wrong-key", "sk-good-key-1x", "Basic sk-good-key-1"])
def test_missing_or_wrong_key_is_401_with_an_openai_error(serve, presented):
    s = serve(api_keys=["sk-good-key-1"])
    if presented and presented.startswith("Basic"):
        req = urllib.request.Request(s.url + "/v1/models", headers={"Authorization": presented})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        status, headers, body = e.value.code, dict(e.value.headers), json.loads(e.value.read())
    else:
        status, headers, body = call(s, "/v1/models", presented)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert headers["WWW-Authenticate"] == "Bearer"
    # Still serving: the right key works, and /health needs no key.
    assert call(s, "/v1/models", "sk-good-key-1")[0] == 200
    assert call(s, "/health")[0] == 200


def test_keys_file_model_allowlist_and_rate_limit(serve, tmp_path: Path):
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nsk-any\nsk-alpha models=alpha\nsk-slow models=beta,alpha rpm=2  # bot\n")
    s = serve(api_keys_file=keys)
    assert [m["id"] for m in call(s, "/v1/models", "sk-any")[2]["data"]] == ["alpha", "beta"]
    assert [m["id"] for m in call(s, "/v1/models", "sk-alpha")[2]["data"]] == ["alpha"]
    assert call(s, "/v1/embeddings", "sk-alpha", embed_body("alpha"))[0] == 200
    assert call(s, "/v1/embeddings", "sk-alpha", embed_body("a" * 12))[0] == 200  # its digest prefix
    status, _, body = call(s, "/v1/embeddings", "sk-alpha", embed_body("beta"))
    assert status == 403 and body["error"]["code"] == "model_not_allowed"
    status, _, body = call(s, "/v1/embeddings", "sk-alpha", embed_body("b" * 64))  # beta by digest
    assert status == 403
    assert call(s, "/v1/embeddings", "sk-slow", embed_body("beta"))[0] == 200
    assert call(s, "/v1/models", "sk-slow")[0] == 200
    status, headers, body = call(s, "/v1/models", "sk-slow")
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert call(s, "/v1/models", "sk-any")[0] == 200  # other keys are not limited by it


@pytest.mark.parametrize(
    "line",
    ["sk-a models=", "sk-a rpm=0", "sk-a rpm=x", "sk-a colour=red", "\x1bkey"],
)
def test_bad_key_lines_are_refused_with_their_place(line):
    with pytest.raises(ValueError, match="keys:3"):
        parse_key_line(line, "keys:3")


def test_a_keys_file_without_keys_or_unreadable_is_refused(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        ApiKeys.load((), empty)
    with pytest.raises(ValueError, match="cannot read"):
        ApiKeys.load((), tmp_path / "missing")


def test_rate_window_slides():
    keys = ApiKeys([k for k in [parse_key_line("sk-x rpm=2", "t")] if k])
    key = keys.keys[0]
    assert keys.admit(key, 0.0) is None and keys.admit(key, 1.0) is None
    assert keys.admit(key, 30.0) == pytest.approx(30.0)
    assert keys.admit(key, 60.5) is None
