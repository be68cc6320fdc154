"""Pure parts of upstream engines: identity, kinds, load signals, errors, request bodies, answers."""

from __future__ import annotations

import json

import pytest

from core.errors import BadRequest, Busy, Refused, Unavailable
from core.types import FinishReason, GenerationRequest, SamplingParams, is_model_id, is_upstream_id
from discovery.advert import ModelAdvert
from engine.runner import LoadFigures
from engine.upstream import UpstreamClient, UpstreamConfig, UpstreamEngine
from engine.upstream_chunks import AnswerReader, BadEvent, request_body
from engine.upstream_runner import combined_load
from engine.upstream_signals import (
    error_for,
    error_message,
    kind_from_owner,
    parse_metrics,
    parse_models,
    parse_slots,
    serial_server,
)

GGUF = "a" * 64


@pytest.mark.parametrize("model_id, gguf_or_upstream, upstream", [
    (GGUF, True, False),
    ("upstream:vllm:0123456789abcdef:meta-llama/Llama-3.1-8B", True, True),
    ("upstream:ollama:0123456789abcdef:llama3.2:1b", True, True),
    ("upstream:evil:0123456789abcdef:x", False, False),
    ("upstream:vllm:0123:x", False, False),
    ("upstream:vllm:0123456789abcdef:has space", False, False),
    ("A" * 64, False, False),
])
def test_model_ids(model_id, gguf_or_upstream, upstream):
    assert is_model_id(model_id) == gguf_or_upstream
    assert is_upstream_id(model_id) == upstream


def test_adverts_hold_upstream_ids_whole_by_the_upstream_engine_only():
    uid = "upstream:openai:0123456789abcdef:m"
    ModelAdvert(uid, "m", 1, 0, 1, "upstream", 0)
    for digest, end, n, engine in [(uid, 1, 2, "upstream"), (uid, 1, 1, "llama.cpp"), (GGUF, 1, 1, "upstream")]:
        with pytest.raises(ValueError):
            ModelAdvert(digest, "m", n, 0, end, engine, 0)


def test_identity_is_stable_and_ignores_created():
    a, _ = parse_models({"data": [{"id": "m", "root": "/ckpt", "max_model_len": 4096, "created": 1}]}, "vllm")
    b, _ = parse_models({"data": [{"id": "m", "root": "/ckpt", "max_model_len": 4096, "created": 2}]}, "vllm")
    c, _ = parse_models({"data": [{"id": "m", "root": "/other", "max_model_len": 4096}]}, "vllm")
    assert a == b and a[0].model_id != c[0].model_id and a[0].context_length == 4096
    only, skipped = parse_models({"data": [{"id": "m"}, {"id": "n"}, {"id": "bad name"}]}, "openai", ("m", "bad name"))
    assert [m.name for m in only] == ["m"] and len(skipped) == 1


def test_metrics_per_model():
    text = ('# HELP x\nvllm:num_requests_running{model_name="a"} 3.0\nvllm:num_requests_running{model_name="b"} 5\n'
            'vllm:num_requests_waiting{model_name="a"} 2\nvllm:kv_cache_usage_perc{model_name="a"} 0.5\n')
    s = parse_metrics(text, "vllm", "a")
    assert (s.running, s.waiting, s.kv_usage) == (3, 2, 0.5)
    assert parse_metrics("garbage {{{\n\x00", "vllm", "a").running is None
    assert parse_slots([{"id": 0, "is_processing": True}, {"id": 1, "is_processing": False}]).running == 1


@pytest.mark.parametrize("own, running, waiting, kv, cold, want", [
    ((1, 0, 24), None, None, None, False, (1, 0, 24)),
    ((1, 0, 24), 5, 3, None, False, (5, 3, 24)),
    ((0, 0, 24), 0, 0, 0.99, False, (8, 0, 24)),
    ((0, 0, 24), None, None, None, True, (0, 1, 24)),
])
def test_combined_load(own, running, waiting, kv, cold, want):
    assert combined_load(LoadFigures(*own), running, waiting, kv, cold, 8) == LoadFigures(*want)


@pytest.mark.parametrize("status, body, kind, text", [
    (400, b'{"error": {"message": "bad\\u001b[31m thing"}}', BadRequest, "bad [31m thing"),
    (422, b'{"detail": [{"msg": "field required"}]}', BadRequest, "field required"),
    (429, b'{"error": "slow down"}', Busy, "slow down"),
    (500, b"\xff\xfe not json", Unavailable, "not json"),
    (401, b"{}", Unavailable, "credentials"),
])
def test_errors_keep_the_upstreams_message(status, body, kind, text):
    error = error_for(status, error_message(body), "7")
    assert isinstance(error, kind) and text in error.message
    assert "\x1b" not in error.message


def test_body_is_the_clients_with_only_the_mesh_fields_set():
    client = {"model": "alias", "messages": [{"role": "developer", "content": "x"}], "n": 3, "seed": 5,
              "guided_json": {"type": "object"}, "stream": True}
    request = GenerationRequest("r", SamplingParams(seed=6), messages=({"role": "system", "content": "x"},),
                                passthrough=json.dumps(client))
    body, stream = request_body(request, "served")
    assert stream and body["model"] == "served" and body["n"] == 1 and body["seed"] == 6
    assert body["messages"] == client["messages"] and body["guided_json"] == client["guided_json"]
    assert body["stream_options"] == {"include_usage": True}
    completion = GenerationRequest("r", SamplingParams(max_tokens=4), prompt="b", continuation="c",
                                   passthrough=json.dumps({"prompt": ["a", "b"], "max_tokens": 9}))
    body, stream = request_body(completion, "served")
    assert not stream and body["prompt"] == "bc" and body["max_tokens"] == 4


def test_answer_reader():
    reader = AnswerReader(chat=True)
    assert reader.event({"choices": [{"delta": {"role": "assistant"}}]}) is None
    chunk = reader.event({"choices": [{"delta": {"content": "hi"}, "logprobs": {"content": [
        {"token": "hi", "logprob": -0.5, "top_logprobs": [{"token": "hi", "logprob": -0.5}]}]}}]})
    assert chunk.text == "hi" and chunk.logprobs[0].piece == b"hi"
    reader.event({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": '{"a"'}}]}}]})
    reader.event({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
                               "finish_reason": "tool_calls"}]})
    calls, last = reader.end()
    assert calls.text == '<tool_call>\n{"name":"f","arguments":{"a":1}}\n</tool_call>'
    assert last.finish_reason == FinishReason.STOP and last.usage.completion_tokens == 1
    for bad in ([1], {"choices": "x"}, {"choices": [{"delta": "x"}]}, {"no": "choices"}):
        with pytest.raises(BadEvent):
            AnswerReader(chat=True).event(bad)


def test_llama_cpp_pythons_server_is_serial_and_keeps_the_openai_kind():
    ours = {"object": "list", "data": [{"id": "smollm2", "object": "model", "owned_by": "me", "permissions": []}]}
    assert serial_server(ours) and kind_from_owner(ours) is None  # kind "openai": identities unchanged
    vllm = {"data": [{"id": "m", "object": "model", "owned_by": "vllm", "root": "m"}]}
    assert kind_from_owner(vllm) == "vllm" and not serial_server(vllm)
    for other in ({"data": []}, {"data": [{"id": "m", "owned_by": "me"}]}, {"data": "x"}, [],
                  {"data": [ours["data"][0], vllm["data"][0]]}):
        assert not serial_server(other)


@pytest.mark.parametrize("kind, refused", [("openai", True), ("ollama", True), ("vllm", False),
                                           ("sglang", False), ("llama-server", False)])
def test_a_chat_resume_goes_only_to_an_upstream_that_continues_a_message(kind, refused):
    """Anywhere else the final assistant message would be answered anew: the client would get its
    answer twice. A completion resumes anywhere (the text is appended to the prompt)."""
    client = UpstreamClient(UpstreamConfig("http://127.0.0.1:9"))
    client.kind = kind
    engine = UpstreamEngine(client, "served", "upstream:openai:0123456789abcdef:served", 2048)
    chat = GenerationRequest("r", SamplingParams(max_tokens=4), messages=({"role": "user", "content": "x"},),
                             continuation="so far")
    if refused:
        with pytest.raises(Refused, match="cannot continue"):  # not Unavailable: the holder is not backed off
            engine.astream(chat)
    else:
        engine.astream(chat)  # built, never started: no request is sent
    engine.astream(GenerationRequest("r", SamplingParams(max_tokens=4), prompt="p", continuation="c"))
    engine.astream(GenerationRequest("r", SamplingParams(max_tokens=4), messages=chat.messages))
