"""OpenAI tools in and out: the request's tools and tool_choice, the prompt that describes them, and
the model's calls read back out of its text, whole or as stream deltas.

Calls use the Hermes format (`<tool_call>\\n{"name":…,"arguments":{…}}\\n</tool_call>`), what
ChatML-family models (Qwen2.5, Hermes, SmolLM) are trained to write, and what the grammar
(`engine.grammar.tool_calls_grammar`) holds them to, compact JSON, so that the end of a call is
unambiguous while it streams (a raw newline cannot occur inside compact JSON).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from engine.grammar import MAX_TOOLS, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, GrammarError, tool_calls_grammar
from gateway.errors import bad_request

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_DESCRIPTION_CHARS = 4096
_HEAD = re.compile(r'^\{"name":"([A-Za-z0-9_-]{1,64})","arguments":')
_TAIL = "}" + TOOL_CALL_CLOSE


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolChoice:
    tools: tuple[Tool, ...]  # those the model may call
    grammar: str
    required: bool  # calls only (tool_choice required or a named function)


def _tool(raw: Any, i: int) -> Tool:
    param = f"tools[{i}]"
    if not isinstance(raw, dict) or raw.get("type") != "function" or not isinstance(raw.get("function"), dict):
        raise bad_request(f"{param} must be {{'type': 'function', 'function': {{...}}}}.", param=param)
    fn = raw["function"]
    name, description = fn.get("name"), fn.get("description") or ""
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad_request(f"{param}.function.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -.", param=f"{param}.function.name")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
        raise bad_request(f"{param}.function.description must be a string of at most {MAX_DESCRIPTION_CHARS} characters.",
                          param=f"{param}.function.description")
    parameters = fn.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise bad_request(f"{param}.function.parameters must be a JSON schema object.", param=f"{param}.function.parameters")
    return Tool(name, description, parameters)


def parse_tools(body: dict[str, Any]) -> ToolChoice | None:
    """The tools the model may call under `tool_choice`; None when it may call none (no tools, or
    tool_choice "none": then the answer is plain text)."""
    raw, choice = body.get("tools"), body.get("tool_choice")
    if raw is None:
        if choice not in (None, "none", "auto"):
            raise bad_request("'tool_choice' needs 'tools'.", param="tool_choice")
        return None
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_TOOLS:
        raise bad_request(f"'tools' must be a list of 1 to {MAX_TOOLS} tools.", param="tools")
    tools = [_tool(t, i) for i, t in enumerate(raw)]
    if len({t.name for t in tools}) != len(tools):
        raise bad_request("tool names must be unique.", param="tools")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad_request("'parallel_tool_calls' must be a boolean.", param="parallel_tool_calls")
    if choice is None or choice == "auto":
        required = False
    elif choice == "none":
        return None
    elif choice == "required":
        required = True
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        tools = [t for t in tools if t.name == name]
        if not tools:
            raise bad_request(f"tool_choice names a function that is not in 'tools': {str(name)[:64]!r}.",
                              param="tool_choice")
        required = True
    else:
        raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', ...}.",
                          param="tool_choice")
    try:
        grammar = tool_calls_grammar([(t.name, t.parameters) for t in tools], parallel=parallel, allow_text=not required)
    except GrammarError as e:
        raise bad_request(f"tools: a parameters schema cannot be used: {e}", param="tools", code="invalid_schema") from None
    return ToolChoice(tuple(tools), grammar, required)


def tool_prompt(choice: ToolChoice) -> str:
    """The tools' description in the Hermes function-calling prompt."""
    signatures = "\n".join(
        json.dumps({"type": "function", "function": {"name": t.name, "description": t.description,
                                                     "parameters": t.parameters}})
        for t in choice.tools
    )
    must = "You must call at least one function." if choice.required else "You may call one or more functions."
    return (
        "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
        f"XML tags. {must} Don't make assumptions about what values to plug into functions. Here are the "
        f"available tools: <tools>\n{signatures}\n</tools>\nFor each function call return a json object with "
        "function name and arguments within <tool_call></tool_call> XML tags as follows:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-dict>}\n</tool_call>'
    )


def render_tool_calls(raw: Any, param: str) -> str:
    """An assistant message's earlier `tool_calls`, written back as the model writes them."""
    if not isinstance(raw, list) or len(raw) > MAX_TOOLS:
        raise bad_request(f"{param} must be a list of at most {MAX_TOOLS} calls.", param=param)
    out = []
    for call in raw:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise bad_request(f"{param}: each call needs function.name and function.arguments strings.", param=param)
        try:
            arguments = json.loads(fn["arguments"]) if fn["arguments"] else {}
        except ValueError:
            raise bad_request(f"{param}: function.arguments must be JSON text.", param=param) from None
        body = json.dumps({"name": fn["name"], "arguments": arguments}, separators=(",", ":"))
        out.append(TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE)
    return "\n".join(out)


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


@dataclass(slots=True)
class ToolCallReader:
    """Reads calls out of the model's text as it streams. Each `feed` returns the OpenAI deltas that
    became certain: `("content", text)` or `("call", {index, id?, type?, function: {name?, arguments}})`."""

    mode: str = "undecided"  # "undecided" | "content" | "calls"
    calls: list[dict[str, Any]] = field(default_factory=list)  # complete and in progress, OpenAI shape
    _buf: str = ""
    _in_call: bool = False

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self._buf += text
        out: list[tuple[str, Any]] = []
        if self.mode == "undecided":
            stripped = self._buf.lstrip()
            if TOOL_CALL_OPEN.startswith(stripped) and len(stripped) < len(TOOL_CALL_OPEN):
                return out  # it may yet be a call
            self.mode = "calls" if stripped.startswith(TOOL_CALL_OPEN) else "content"
            self._buf = stripped if self.mode == "calls" else self._buf
        if self.mode == "content":
            out.append(("content", self._buf))
            self._buf = ""
            return out
        while True:
            if not self._in_call:
                start = self._buf.find(TOOL_CALL_OPEN)
                head = _HEAD.match(self._buf[start + len(TOOL_CALL_OPEN):]) if start >= 0 else None
                if head is None:
                    return out
                self._buf = self._buf[start + len(TOOL_CALL_OPEN) + head.end():]
                call = {"id": new_call_id(), "type": "function", "function": {"name": head.group(1), "arguments": ""}}
                self.calls.append(call)
                self._in_call = True
                out.append(("call", {"index": len(self.calls) - 1, **call,
                                     "function": {"name": head.group(1), "arguments": ""}}))
            end = self._buf.find(_TAIL)
            if end < 0:
                hold = _held(self._buf)
                piece, self._buf = self._buf[: len(self._buf) - hold], self._buf[len(self._buf) - hold:]
                self._emit(piece, out)
                return out
            self._emit(self._buf[:end], out)
            self._buf = self._buf[end + len(_TAIL):]
            self._in_call = False

    def _emit(self, piece: str, out: list[tuple[str, Any]]) -> None:
        if piece:
            self.calls[-1]["function"]["arguments"] += piece
            out.append(("call", {"index": len(self.calls) - 1, "function": {"arguments": piece}}))

    def finish(self) -> list[tuple[str, Any]]:
        """The end of the text: what was held back while it could still have been a call."""
        if self.mode == "undecided" and self._buf:
            self.mode = "content"
            text, self._buf = self._buf, ""
            return [("content", text)]
        return []

    @property
    def complete_calls(self) -> list[dict[str, Any]]:
        """Calls whose text closed (an answer cut by max_tokens may end inside one)."""
        return self.calls[:-1] if self._in_call else list(self.calls)


def _held(buf: str) -> int:
    """How many trailing characters could be the start of a call's end (held back, not arguments)."""
    for n in range(min(len(_TAIL), len(buf)), 0, -1):
        if buf.endswith(_TAIL[:n]):
            return n
    return 0


def read_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole answer: (content, complete calls)."""
    reader = ToolCallReader()
    parts = reader.feed(text) + reader.finish()
    content = "".join(value for kind, value in parts if kind == "content")
    return (content if reader.mode != "calls" else None), reader.complete_calls
