"""The API's start-up rules (a non-loopback API needs a key or --api-open) and terminal-safe `meshllm peers`."""

from __future__ import annotations

import pytest

from node.cli import _config, build_parser, terminal_safe


def config(*args: str):
    return _config(build_parser().parse_args(["node", "join", *args]))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "my-host.lan", ""])
def test_a_non_loopback_api_needs_a_key_or_api_open(host):
    with pytest.raises(ValueError, match="--api-open"):
        config("--http-host", host)
    assert config("--http-host", host, "--api-key", "sk-1").api_keys == ("sk-1",)
    assert config("--http-host", host, "--api-open").api_open


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"])
def test_loopback_needs_no_key(host):
    assert config("--http-host", host).api_keys == ()


@pytest.mark.parametrize("key", ["has space", "tab\tkey", "\x1b[2J", "x" * 257])
def test_bad_keys_are_refused(key):
    with pytest.raises(ValueError, match="API key"):
        config("--api-key", key)


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("evil\x1b[2J\x1b]0;title\x07", "evil?[2J?]0;title?"),
        ("csi\x9b31m", "csi?31m"),  # the 8-bit CSI
        ("rtl\u202egnp.exe", "rtl?gnp.exe"),
        ("line\u2028break\r", "line?break?"),
        ("ok name ü 日本\n", "ok name ü 日本\n"),
    ],
)
def test_peer_text_cannot_drive_the_terminal(raw, shown):
    assert terminal_safe(raw) == shown
