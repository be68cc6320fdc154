"""API keys through a real node: the daemon hands --api-key to the gateway, and /v1/* enforces it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def _status(url: str, key: str | None) -> int:
    body = json.dumps({"model": "smollm2-135m-instruct", "prompt": "Hi", "max_tokens": 2}).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(url + "/v1/completions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_a_node_started_with_a_key_refuses_requests_without_it(node_factory):
    node = node_factory("K", "--api-key", "sk-right-key", "--threads", "1")
    assert _status(node.url, None) == 401
    assert _status(node.url, "sk-wrong-key") == 401
    assert _status(node.url, "sk-right-key") == 200
    with urllib.request.urlopen(node.url + "/health", timeout=10) as resp:  # health stays open
        assert resp.status == 200
