"""OpenAI parity through the mesh (issue 15), with the official SDK's strict types, on two routes:
- "pipeline": a gateway holding no model in front of a 2-stage torch pipeline (layers [0, 15) and
  [15, 30) on two nodes): the grammar and log probabilities live on the last stage;
- "routed": a gateway holding no model that routes to a llama.cpp holder over gRPC.
Structured output, a tool round trip (streamed and not), a forced tool, logprobs, seeded n, token-id
prompts and (routed) token-id embeddings."""

from __future__ import annotations

import json
import secrets
import time
import urllib.request

import llama_cpp
import openai
import pytest
from pydantic import BaseModel, Field

from engine.model_file import resolve_path

MODEL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
FORCED = {"type": "function", "function": {"name": "get_weather"}}


class City(BaseModel):
    # bounded, so that a 135M model looping inside a string still closes the object in time
    name: str = Field(max_length=16)
    country: str = Field(max_length=16)
    capital: bool


def _nodes(url: str) -> list[str]:
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as resp:
        data = json.loads(resp.read())["data"]
    return data[0]["meshllm"]["nodes"] if data else []


def _wait_for(url: str, nodes: list[str], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while _nodes(url) != nodes:
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} never listed {nodes}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def gateways(module_node_factory) -> dict[str, str]:
    pipe, routed = "pm-" + secrets.token_hex(4), "rt-" + secrets.token_hex(4)
    one = ("--threads", "1")
    made = module_node_factory.many({
        "PG": ("--no-model", "--mesh-secret", pipe),
        "PA": ("--shard", f"{MODEL}:0-15", *one, "--mesh-secret", pipe),
        "PB": ("--shard", f"{MODEL}:15-30", *one, "--mesh-secret", pipe),
        "RG": ("--no-model", "--mesh-secret", routed),
        "RH": (*one, "--ctx-size", "2048", "--mesh-secret", routed),
    })
    _wait_for(made["PG"].url, ["PA", "PB"])
    _wait_for(made["RG"].url, ["RH"])
    return {"pipeline": made["PG"].url, "routed": made["RG"].url}


@pytest.fixture(scope="module", params=["pipeline", "routed"])
def route(request, gateways) -> tuple[str, openai.OpenAI]:
    url = gateways[request.param]
    return request.param, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=180)


def test_served_by_the_route(route):
    name, client = route
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=ASK, max_tokens=1)
    assert raw.headers["x-meshllm-node"] == ("PA+PB" if name == "pipeline" else "RH")


def test_parse_returns_a_valid_object(route):
    _, client = route
    r = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City, temperature=0, max_tokens=60,
    )
    assert r.choices[0].finish_reason == "stop", r.choices[0]
    assert isinstance(r.choices[0].message.parsed, City)


def _check_call(call) -> None:
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")


@pytest.mark.parametrize("stream", [False, True])
def test_two_turn_tool_round_trip_with_a_forced_function(route, stream):
    _, client = route
    # one call, then the grammar allows only the end (parallel calls would let a 135M model go on)
    kwargs = dict(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=FORCED, parallel_tool_calls=False,
                  temperature=0, max_tokens=48, seed=1)
    if stream:
        with client.chat.completions.stream(**kwargs) as s:
            first = s.get_final_completion()  # the SDK's accumulator rebuilds the calls from the deltas
    else:
        first = client.chat.completions.create(**kwargs)
    assert first.choices[0].finish_reason == "tool_calls", first.choices[0].message
    call = first.choices[0].message.tool_calls[0]
    _check_call(call)
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})},
    ]
    second = dict(model=MODEL, messages=history, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=12)
    if stream:  # (the SDK's stream helper refuses an answer cut at max_tokens: plain chunks here)
        chunks = list(client.chat.completions.create(**second, stream=True, stream_options={"include_usage": True}))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
        usage = chunks[-1].usage
    else:
        answer = client.chat.completions.create(**second)
        content, usage = answer.choices[0].message.content, answer.usage
        assert not answer.choices[0].message.tool_calls
    assert content
    alone = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)
    assert usage.prompt_tokens > alone.usage.prompt_tokens + 20  # the call and its result were rendered


def test_logprobs_top_entry_is_the_sampled_token(route):
    _, client = route
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=6, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert t.logprob <= 0 and len(t.top_logprobs) == 3


def test_n_choices_with_a_seed_are_reproducible(route):
    _, client = route

    def run() -> list[str]:
        r = client.chat.completions.create(model=MODEL, messages=ASK, n=3, seed=42, temperature=1.0, max_tokens=6)
        assert [c.index for c in r.choices] == [0, 1, 2]
        return [c.message.content for c in r.choices]

    first = run()
    assert run() == first and len(set(first)) > 1  # reproducible, and each choice has its own seed


def _ids(text: str) -> list[int]:
    llm = llama_cpp.Llama(model_path=str(resolve_path(MODEL)[0]), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=llm._model.add_bos_token(), special=True)
    finally:
        llm.close()


def test_completion_prompts_as_ids_and_as_a_list(route):
    _, client = route
    texts = ["The capital of France is", "Water boils at"]
    common = dict(model=MODEL, temperature=0, max_tokens=4, seed=5)  # seeded: a fresh prefill on llama.cpp
    alone = [client.completions.create(prompt=t, **common).choices[0].text for t in texts]
    by_ids = client.completions.create(prompt=_ids(texts[0]), **common)
    assert by_ids.choices[0].text == alone[0]
    both = client.completions.create(prompt=[_ids(texts[0]), texts[1]], **common)
    assert [(c.index, c.text) for c in both.choices] == [(0, alone[0]), (1, alone[1])]
    assert both.usage.prompt_tokens == by_ids.usage.prompt_tokens + len(_ids(texts[1]))
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.completions.create(prompt=[1, 2, 1 << 20], **common)


def test_embeddings_of_ids(route):
    name, client = route
    if name == "pipeline":
        pytest.skip("a pipeline of layer ranges serves no embeddings")
    text = "hello world"
    # llama.cpp's embed tokenises text with BOS and no special tokens: the same ids give the same vector
    llm = llama_cpp.Llama(model_path=str(resolve_path(MODEL)[0]), vocab_only=True, verbose=False)
    ids = llm.tokenize(text.encode(), add_bos=True, special=False)
    llm.close()
    r = client.embeddings.create(model=MODEL, input=[text, ids])  # one text and one id list
    by_text, by_ids = r.data[0].embedding, r.data[1].embedding
    assert sum(a * b for a, b in zip(by_text, by_ids, strict=True)) == pytest.approx(1.0, abs=1e-4)
    lists = client.embeddings.create(model=MODEL, input=[ids, ids[:2]])  # langchain's shape: lists of ids
    assert len(lists.data) == 2 and lists.usage.prompt_tokens == len(ids) + 2
