"""OpenAI parity on a real whole-model node (llama.cpp engine), through the official SDK's strict types:
structured output, tools, logprobs, n, seeds, and the smaller parts of the API (issue 15)."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

import llama_cpp
import openai
import pytest
from openai.types.chat import ChatCompletion
from pydantic import BaseModel, Field

from engine.model_file import resolve_path

MODEL = "smollm2-135m-instruct"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Person(BaseModel):
    # Bounded, so that a 135M model looping inside a string still closes the object in time.
    name: str = Field(max_length=24)
    age: int
    colours: list[str] = Field(max_length=3)


@pytest.fixture(scope="module")
def node(module_node_factory):
    return module_node_factory("parity-node", "--threads", "2", "--ctx-size", "2048")


@pytest.fixture(scope="module")
def client(node):
    return openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(node, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(node.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def check_weather_call(call) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "unit"} and isinstance(args["city"], str) and args["unit"] in ("celsius", "fahrenheit")


def test_parse_returns_a_valid_object(client):
    r = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format=Person, temperature=0, max_tokens=200,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(choice.message.parsed, Person)


def test_json_object_mode_gives_json(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Give me a JSON object about cats."}],
        response_format={"type": "json_object"}, temperature=0.7, seed=3, max_tokens=200,
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a prefix of an object
        assert r.choices[0].message.content.startswith("{")


def test_schema_answer_cut_short_is_length_not_a_hang(client):
    with pytest.raises(openai.LengthFinishReasonError) as cut:
        client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Person, temperature=0, max_tokens=3)
    assert cut.value.completion.choices[0].finish_reason == "length"
    assert cut.value.completion.choices[0].message.content.startswith('{"name":')


def test_tool_choice_forces_the_named_function(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=100,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    assert isinstance(r, ChatCompletion)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        check_weather_call(call)


def test_tool_choice_required_and_not_parallel_gives_one_call(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False,
        temperature=0, max_tokens=100,
    )
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time") and isinstance(json.loads(call.function.arguments), dict)
    assert r.choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_answers_in_text(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=20)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


def test_tool_choice_auto_gives_text_or_valid_calls(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=60)
    message = r.choices[0].message
    if message.tool_calls:
        assert r.choices[0].finish_reason in ("tool_calls", "length")
        for call in message.tool_calls:
            check_weather_call(call)
    else:
        assert message.content and not message.content.startswith("<")


@pytest.mark.parametrize("stream", [False, True])
def test_two_turn_tool_round_trip(client, stream):
    forced = {"type": "function", "function": {"name": "get_weather"}}
    if stream:
        # seeded: the same tokens whatever llama.cpp's prefix cache holds (greedy alone is not enough)
        with client.chat.completions.stream(
            model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=forced, temperature=0, max_tokens=100, seed=1,
        ) as s:
            first = s.get_final_completion()  # the SDK's accumulator rebuilds the calls from deltas
        plain = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=forced,
                                               temperature=0, max_tokens=100, seed=1)
        def calls(r):
            return [(c.id[:5], c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls]

        assert calls(first) == calls(plain)
    else:
        first = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=forced,
                                               temperature=0, max_tokens=100)
    assert first.choices[0].finish_reason == "tool_calls"
    call = first.choices[0].message.tool_calls[0]
    check_weather_call(call)
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})},
    ]
    kwargs = dict(model=MODEL, messages=history, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=40)
    if stream:
        with client.chat.completions.stream(**kwargs, stream_options={"include_usage": True}) as s:
            answer = s.get_final_completion()
    else:
        answer = client.chat.completions.create(**kwargs)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    alone = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)
    # the call and its result were rendered into the prompt (about 30 tokens)
    assert answer.usage.prompt_tokens > alone.usage.prompt_tokens + 20


def _direct_logprobs(prompt: str) -> list[float]:
    """log softmax of llama.cpp's own logits for the prompt's next token (no meshllm code involved)."""
    llm = llama_cpp.Llama(model_path=str(resolve_path(MODEL)[0]), n_ctx=512, n_threads=2, verbose=False)
    try:
        llm.eval(llm.tokenize(prompt.encode(), add_bos=llm._model.add_bos_token(), special=True))
        logits = llm._ctx.get_logits_ith(-1)
        row = [logits[i] for i in range(llm.n_vocab())]
    finally:
        llm.close()
    top = max(row)
    lse = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - lse for x in row]


def test_logprobs_top_entry_is_the_sampled_token_and_match_the_engine(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=8, logprobs=True, top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 5 and t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob) and t.logprob <= 0
        assert bytes(t.bytes) == t.token.encode()

    prompt = "The capital of France is"
    c = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=1, logprobs=3)
    lp = c.choices[0].logprobs
    direct = _direct_logprobs(prompt)
    best = max(range(len(direct)), key=direct.__getitem__)
    assert lp.token_logprobs[0] == pytest.approx(direct[best], abs=1e-3)
    assert list(lp.top_logprobs[0].values())[0] == pytest.approx(direct[best], abs=1e-3)


def test_logprobs_stream_too(client):
    pieces, logprobs = [], []
    for chunk in client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=8,
                                                logprobs=True, top_logprobs=2, stream=True):
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            if choice.logprobs and choice.logprobs.content:
                logprobs.extend(choice.logprobs.content)
    assert len(logprobs) == 8 and "".join(t.token for t in logprobs) == "".join(pieces)


def test_n_choices_with_a_seed_are_reproducible(client):
    def run():
        r = client.chat.completions.create(model=MODEL, messages=ASK, n=3, seed=42, temperature=1.0, max_tokens=12)
        assert [c.index for c in r.choices] == [0, 1, 2]
        return [c.message.content for c in r.choices], r.usage

    first, usage = run()
    # another request sharing the prompt's prefix fills the cache in between
    client.chat.completions.create(model=MODEL, messages=[*ASK, {"role": "assistant", "content": "Sunny."}],
                                   temperature=1.0, max_tokens=4)
    second, _ = run()
    assert first == second
    assert len(set(first)) > 1  # each choice has its own seed
    assert usage.completion_tokens == 36 or usage.completion_tokens < 36


def test_n_choices_stream_with_indices(client):
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in client.chat.completions.create(model=MODEL, messages=ASK, n=2, seed=1, max_tokens=6, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert set(finishes) == {0, 1} and all(texts.values())


def test_seed_is_reproducible_whatever_the_cache_holds(client):
    def seeded():
        return client.chat.completions.create(model=MODEL, messages=ASK, seed=7, temperature=1.0, max_tokens=24)

    first = seeded()
    client.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, max_tokens=10)  # same prompt, unseeded
    second = seeded()
    assert first.choices[0].message.content == second.choices[0].message.content


def test_cached_tokens_are_reported(client):
    prompt = [{"role": "user", "content": "Tell me about the sea and its many fish."}]
    client.chat.completions.create(model=MODEL, messages=prompt, temperature=0, max_tokens=2)
    again = client.chat.completions.create(model=MODEL, messages=prompt, temperature=0, max_tokens=2)
    # all of it when the saved prompt logits serve the repeat (nothing is computed), else its prefix
    assert 0 < again.usage.prompt_tokens_details.cached_tokens <= again.usage.prompt_tokens


def test_completions_max_tokens_defaults_to_16(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0)
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_logit_bias_forces_a_token(client):
    r = client.completions.create(model=MODEL, prompt="Hello", temperature=0, max_tokens=4, logprobs=0,
                                  logit_bias={"28": 100})
    assert len(set(r.choices[0].logprobs.tokens)) == 1  # token 28, four times


def test_model_by_id(client, node):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_embedding_dimensions_truncate_and_renormalise(client):
    r = client.embeddings.create(model=MODEL, input="hello world", dimensions=64)
    vector = r.data[0].embedding
    assert len(vector) == 64 and sum(x * x for x in vector) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strong"}}}}}}, "response_format"),
        ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "description": "x" * 70000}}}}, "response_format"),
        ("/v1/chat/completions", {"tools": [WEATHER] * 2}, "tools"),
        ("/v1/chat/completions", {"tools": [{**WEATHER, "function": {**WEATHER["function"], "name": f"f{i}"}} for i in range(65)]}, "tools"),
        ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
        ("/v1/chat/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
        ("/v1/chat/completions", {"functions": [WEATHER["function"]]}, "functions"),
        ("/v1/completions", {"echo": True}, "echo"),
        ("/v1/completions", {"best_of": 2}, "best_of"),
        ("/v1/completions", {"suffix": "end"}, "suffix"),
    ],
)
def test_bad_parity_input_is_a_clear_400(node, path, extra, param):
    body = {"model": MODEL, **({"messages": ASK} if "chat" in path else {"prompt": "Hi"}), **extra}
    status, payload = post(node, path, body)
    assert status == 400, payload
    assert param in (payload["error"]["param"] or ""), payload
    if "response_format" in extra and "strong" in json.dumps(extra):
        assert "strong" in payload["error"]["message"]  # names the problem


def test_unknown_fields_are_ignored(node):
    status, payload = post(node, "/v1/chat/completions", {"model": MODEL, "messages": ASK, "max_tokens": 2,
                                                          "store": False, "metadata": {"a": "b"}, "user": "u", "wibble": 1})
    assert status == 200 and payload["choices"][0]["message"]["content"]
