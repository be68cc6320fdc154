"""Grammars for constrained decoding, as llguidance grammar text (what `SamplingParams.grammar` carries).

Built and validated where a request enters (no tokenizer needed), compiled against a vocabulary where
sampling happens (`engine/constraint.py`). llguidance was picked over xgrammar by measurement
(docs/dependencies.md). JSON is generated compact (no free whitespace: a small model given the choice
pads with newlines until max_tokens), with "," and ":" as separators.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance

MAX_SCHEMA_CHARS = 64 << 10  # one schema, serialised
MAX_TOOLS = 64
_JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False, "item_separator": ",", "key_separator": ":",
}
# The parser's own limits, tighter than its defaults: a hostile schema costs bounded time per token.
_LIMITS = llguidance.LLParserLimits(step_lexer_fuel=200_000, step_max_items=50_000, max_grammar_size=200_000,
                                    verbose_errors=False)
TOOL_CALL_OPEN = "<tool_call>\n"
TOOL_CALL_CLOSE = "\n</tool_call>"


class GrammarError(ValueError):
    """A schema or grammar llguidance cannot compile; the message names the problem."""


def limits() -> llguidance.LLParserLimits:
    return _LIMITS


def _dumps(schema: Any, what: str) -> str:
    text = json.dumps(schema, separators=(",", ":"))
    if len(text) > MAX_SCHEMA_CHARS:
        raise GrammarError(f"{what} is longer than {MAX_SCHEMA_CHARS} characters")
    return text


def validate(grammar: str) -> str:
    """Returns the grammar, or raises GrammarError with llguidance's message."""
    error = llguidance.LLMatcher.validate_grammar(grammar, None, limits=_LIMITS)
    if error and not error.startswith("WARNING"):
        raise GrammarError(error)
    return grammar


def json_schema_grammar(schema: dict[str, Any], *, strict: bool = True) -> str:
    """JSON text matching `schema`. Not strict: keywords llguidance does not implement are ignored."""
    options: Any = {**_JSON_OPTIONS, "lenient": not strict}
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(_dumps(schema, "the schema"), defaults=options)
    except ValueError as e:
        raise GrammarError(str(e)) from None
    return validate(grammar)


def json_object_grammar() -> str:
    return json_schema_grammar({"type": "object"})


def _call_schema(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        "x-guidance": {**_JSON_OPTIONS, "lenient": True},  # %json in Lark takes its options from here
    }


def tool_calls_grammar(functions: list[tuple[str, dict[str, Any]]], *, parallel: bool, allow_text: bool) -> str:
    """Tool calls in the Hermes format (`<tool_call>\\n{"name":…,"arguments":{…}}\\n</tool_call>`),
    each call's JSON under its function's parameters schema. `allow_text`: the answer may instead be
    plain text that does not start with "<" (tool_choice auto); else it must be calls (required or
    a named function). `parallel`: one or more calls, one per line; else exactly one."""
    if not 0 < len(functions) <= MAX_TOOLS:
        raise GrammarError(f"between 1 and {MAX_TOOLS} tools")
    rules = []
    for i, (name, parameters) in enumerate(functions):
        schema = _dumps(_call_schema(name, parameters), f"the parameters of tool '{name}'")
        rules.append(f"fn{i}: %json {schema}")
    alternatives = " | ".join(f"fn{i}" for i in range(len(functions)))
    call = f"call: {json.dumps(TOOL_CALL_OPEN)} ({alternatives}) {json.dumps(TOOL_CALL_CLOSE)}"
    calls = 'calls: call ("\\n" call)*' if parallel else "calls: call"
    start = "start: calls | TEXT" if allow_text else "start: calls"
    lark = "\n".join([start, calls, call, *rules, 'TEXT: /[^<\\s][\\s\\S]*/' if allow_text else ""])
    return validate(llguidance.LLMatcher.grammar_from_lark(lark))
