"""`meshllm chat [MODEL] [PROMPT]`: chat with the mesh from a terminal through a node's OpenAI API.

With PROMPT: one answer, streamed to stdout, for scripts (exit 1 on any error). Without: a
conversation read line by line from stdin (`/model NAME`, `/clear`, `/exit`), history kept.
A model's output is text we did not write: it is printed terminal-safe (no escape sequences).
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO

from node.terminal import terminal_safe

HELP = "/model NAME: switch model (history kept)   /clear: forget the conversation   /exit: leave"


class ChatError(Exception):
    """What went wrong, in one line for the user."""


@dataclass(slots=True)
class ChatClient:
    url: str
    api_key: str | None = None
    timeout_s: float = 600.0

    def _open(self, path: str, body: dict | None = None):  # -> http.client.HTTPResponse
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url.rstrip("/") + path, data=data, headers=headers)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout_s)
        except urllib.error.HTTPError as e:
            raise ChatError(f"HTTP {e.code}: {_error_message(e.read())}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ChatError(f"cannot reach {self.url}: {getattr(e, 'reason', e)}") from None

    def models(self) -> list[str]:
        with self._open("/v1/models") as resp:
            try:
                return [str(m["id"]) for m in json.loads(resp.read())["data"]]
            except (ValueError, KeyError, TypeError) as e:
                raise ChatError(f"{self.url} did not answer /v1/models as expected: {e}") from None

    def stream(self, model: str, messages: list[dict[str, str]], params: dict) -> Iterator[str]:
        """Yields the answer's text as it streams; raises ChatError on any failure, even mid-stream."""
        body = {**params, "model": model, "messages": messages, "stream": True}
        with self._open("/v1/chat/completions", body) as resp:
            try:
                for line in resp:
                    if not line.startswith(b"data: "):
                        continue
                    payload = line[6:].strip()
                    if payload == b"[DONE]":
                        return
                    event = json.loads(payload)
                    if "error" in event:
                        raise ChatError(_error_message(payload))
                    for choice in event.get("choices") or ():
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            yield str(text)
            except (ValueError, AttributeError, TypeError) as e:
                raise ChatError(f"malformed stream from {self.url}: {e}") from None
            except OSError as e:
                raise ChatError(f"the stream from {self.url} broke: {e}") from None
        raise ChatError("the stream ended before [DONE]")


def _error_message(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode("utf-8", "replace") or "no details"


@dataclass(slots=True)
class Conversation:
    client: ChatClient
    model: str
    params: dict
    out: TextIO
    err: TextIO
    history: list[dict[str, str]] = field(default_factory=list)

    def ask(self, text: str) -> bool:
        """One turn, streamed to `out`; False (and the turn forgotten) when it failed."""
        self.history.append({"role": "user", "content": text})
        parts: list[str] = []
        try:
            for piece in self.client.stream(self.model, self.history, self.params):
                parts.append(piece)
                self.out.write(terminal_safe(piece))
                self.out.flush()
        except ChatError as e:
            self.history.pop()
            self.out.write("\n" if parts else "")
            print(f"meshllm: error: {terminal_safe(str(e))}", file=self.err)
            return False
        except KeyboardInterrupt:
            self.history.pop()
            self.out.write("\n")
            print("(interrupted)", file=self.err)
            return False
        self.out.write("\n")
        self.out.flush()
        self.history.append({"role": "assistant", "content": "".join(parts)})
        return True

    def command(self, line: str) -> bool:
        """A /command; False on /exit."""
        name, _, arg = line.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/clear":
            self.history.clear()
            print("(conversation cleared)", file=self.err)
        elif name == "/model" and arg.strip():
            self.switch(arg.strip())
        else:
            print(HELP, file=self.err)
        return True

    def switch(self, model: str) -> None:
        try:
            known = self.client.models()
        except ChatError as e:
            print(f"meshllm: error: {terminal_safe(str(e))}", file=self.err)
            return
        if model not in known:
            print(f"meshllm: no model {terminal_safe(model)!r} here; the mesh serves: "
                  f"{terminal_safe(', '.join(known)) or 'nothing'}", file=self.err)
            return
        self.model = model
        print(f"(now chatting with {terminal_safe(model)})", file=self.err)


def run_chat(url: str, model: str | None, prompt: str | None, *, api_key: str | None = None,
             system: str | None = None, params: dict | None = None,
             stdin: TextIO = sys.stdin, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """0 when every turn was answered; 1 when one failed; 2 when the chat could not start."""
    client = ChatClient(url, api_key)
    if model is None:
        try:
            models = client.models()
        except ChatError as e:
            print(f"meshllm: error: {terminal_safe(str(e))}", file=err)
            return 2
        if not models:
            print(f"meshllm: error: {url} serves no model", file=err)
            return 2
        model = models[0]
    chat = Conversation(client, model, params or {}, out, err)
    if system:
        chat.history.append({"role": "system", "content": system})
    if prompt is not None:
        return 0 if chat.ask(prompt) else 1
    interactive = stdin.isatty()
    if interactive:
        import readline  # noqa: F401 - line editing and history for input()
    print(f"chatting with {terminal_safe(model)} at {url}. {HELP}", file=err)
    failed = False
    while True:
        try:
            line = input("> ") if interactive and stdin is sys.stdin else stdin.readline()
        except EOFError:
            break
        except KeyboardInterrupt:
            out.write("\n")
            return 130
        if not line:  # EOF from readline()
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            if not chat.command(line.strip()):
                break
            continue
        failed = not chat.ask(line) or failed
    return 1 if failed else 0
