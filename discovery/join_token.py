"""Join tokens: the one string that lets another machine join a mesh (`meshllm node join --token T`).

    token = base64url_nopad(b"\\x01" + msgpack {"s": mesh secret, "b": [libp2p bootstrap multiaddrs]})

A token carries the mesh secret, so it is as sensitive as the secret itself. Decoding is strict:
one version, a size cap, only the known keys, a secret of a sane length, at most 16 bootstrap
addresses each shaped like `/ip4|ip6|dns*/…/p2p/…`. Anything else is a `ValueError` with a reason.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from dataclasses import dataclass

import msgpack

TOKEN_VERSION = 1
MAX_TOKEN_CHARS = 4096
MIN_SECRET_CHARS = 16
MAX_SECRET_CHARS = 256
MAX_BOOTSTRAP = 16
MAX_ADDR_CHARS = 256
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_MULTIADDR = re.compile(r"/(ip4|ip6|dns|dns4|dns6)/[^/\s]+/tcp/\d{1,5}/p2p/[1-9A-HJ-NP-Za-km-z]+")


@dataclass(frozen=True, slots=True)
class JoinToken:
    secret: str
    bootstrap: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_secret(self.secret)
        if len(self.bootstrap) > MAX_BOOTSTRAP:
            raise ValueError(f"a join token holds at most {MAX_BOOTSTRAP} bootstrap addresses")
        for addr in self.bootstrap:
            if not isinstance(addr, str) or not is_bootstrap_addr(addr):
                raise ValueError("a join token's bootstrap address is not a /ip4/…/tcp/…/p2p/… multiaddr")


def is_bootstrap_addr(addr: str) -> bool:
    return len(addr) <= MAX_ADDR_CHARS and _MULTIADDR.fullmatch(addr) is not None


def new_secret() -> str:
    """A fresh random mesh secret (256 bits)."""
    return secrets.token_urlsafe(32)


def check_secret(secret: object) -> str:
    if not isinstance(secret, str) or not MIN_SECRET_CHARS <= len(secret) <= MAX_SECRET_CHARS:
        raise ValueError(f"a join token's secret must be {MIN_SECRET_CHARS} to {MAX_SECRET_CHARS} characters")
    if not secret.isprintable() or any(c.isspace() for c in secret):
        raise ValueError("a join token's secret must be printable, without spaces")
    return secret


def encode_token(token: JoinToken) -> str:
    body: dict[str, object] = {"s": token.secret}
    if token.bootstrap:
        body["b"] = list(token.bootstrap)
    raw = bytes([TOKEN_VERSION]) + msgpack.packb(body, use_bin_type=True)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_token(text: str) -> JoinToken:
    """The token's secret and bootstrap addresses; ValueError (with a reason) for anything malformed."""
    text = text.strip()
    if not text or len(text) > MAX_TOKEN_CHARS or not _B64URL.fullmatch(text):
        raise ValueError("not a join token (expected base64url text from `meshllm node join --lan`)")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not a join token (bad base64url)") from None
    if not raw or raw[0] != TOKEN_VERSION:
        raise ValueError(f"unsupported join token version (this meshllm reads version {TOKEN_VERSION})")
    try:
        body = msgpack.unpackb(
            raw[1:], raw=False, strict_map_key=True, max_str_len=MAX_TOKEN_CHARS, max_bin_len=0,
            max_array_len=MAX_BOOTSTRAP + 1, max_map_len=4, max_ext_len=0,
        )
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException):
        raise ValueError("not a join token (bad payload)") from None
    if not isinstance(body, dict) or not {"s"} <= set(body) <= {"s", "b"}:
        raise ValueError("not a join token (unexpected fields)")
    bootstrap = body.get("b", [])
    if not isinstance(bootstrap, list):
        raise ValueError("not a join token (bootstrap must be a list)")
    return JoinToken(check_secret(body["s"]), tuple(bootstrap))
