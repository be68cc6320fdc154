"""GET /mesh/advert on a LAN node answers members only (issue 11: the advert names our models,
addresses and resources; gRPC GetAdvert already needs the token). On loopback it stays open to this
machine. Two LAN nodes still find each other: their fetches carry the token."""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request

import pytest
from conftest import NodeProc

from discovery.envelope import decode_signed, mesh_key_from_secret
from discovery.fetch import ADVERT_TOKEN_HEADER, advert_token


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def node_id(url: str) -> str:
    return get_json(url + "/mesh/self")["node_id"]


def fetch(url: str, token: str | None) -> tuple[int, bytes]:
    headers = {ADVERT_TOKEN_HEADER: token} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/mesh/advert", headers=headers), timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_a_lan_node_serves_its_advert_to_members_only(node_factory) -> None:
    secret = "adv-" + secrets.token_hex(4)
    key = mesh_key_from_secret(secret)
    # LAN mode on the loopback interface (zeroconf and the LAN fetch path run, as on a LAN)
    args = ("--no-model", "--mesh-secret", secret, "--lan", "--advertise-host", "127.0.0.1")
    started = node_factory.many({"A": args, "B": args})
    a, b = started["A"], started["B"]
    other_mesh = advert_token(mesh_key_from_secret("another mesh"))
    for token in (None, "", other_mesh, advert_token(key)[:-1] + "0", "x" * 5000):
        status, body = fetch(a.url, token)
        assert status == 401, (token, status)
        assert b"meshllm" not in body and len(body) < 200
    status, body = fetch(a.url, advert_token(key))
    assert status == 200 and decode_signed(body, key).node_id == node_id(a.url)

    # discovery over mDNS pointers + fetches still works: each lists the other
    ids = {node_id(a.url), node_id(b.url)}
    deadline = time.monotonic() + 20
    while True:
        seen = [{p["node_id"] for p in get_json(n.url + "/mesh/peers")} for n in (a, b)]
        if seen == [ids - {node_id(a.url)}, ids - {node_id(b.url)}]:
            break
        assert time.monotonic() < deadline, seen
        time.sleep(0.2)
    assert a.proc.poll() is None and b.proc.poll() is None


@pytest.fixture(scope="module")
def loopback_node(module_node_factory) -> tuple[NodeProc, str]:
    """One loopback node for both tokens below: fetching its advert changes nothing on it."""
    secret = "adv-" + secrets.token_hex(4)
    return module_node_factory("L", "--no-model", "--mesh-secret", secret), secret


@pytest.mark.parametrize("token", [None, "wrong"])
def test_a_loopback_node_serves_its_advert_to_this_machine(loopback_node, token) -> None:
    node, secret = loopback_node
    status, body = fetch(node.url, token)
    assert status == 200 and decode_signed(body, mesh_key_from_secret(secret)).node_id == node_id(node.url)
