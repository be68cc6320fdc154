from __future__ import annotations

import pytest

from gateway.errors import ApiError
from gateway.openai_requests import parse_chat, parse_completion, parse_embeddings

MSG = [{"role": "user", "content": "hi"}]


def test_chat_defaults_and_fields():
    p = parse_chat({"model": "m", "messages": MSG, "max_tokens": 5, "temperature": 0, "stop": "x", "seed": 3,
                    "stream": True, "stream_options": {"include_usage": True}, "top_k": 4, "min_p": 0.1})
    assert p.model == "m" and p.stream and p.include_usage
    assert (p.params.max_tokens, p.params.temperature, p.params.stop, p.params.seed) == (5, 0.0, ("x",), 3)
    assert (p.params.top_k, p.params.min_p) == (4, 0.1)
    assert p.messages == ({"role": "user", "content": "hi"},)


def test_content_parts_and_developer_role():
    p = parse_chat({"model": "m", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert p.messages == ({"role": "system", "content": "ab"},)


def test_max_completion_tokens_wins():
    assert parse_chat({"model": "m", "messages": MSG, "max_completion_tokens": 7, "max_tokens": 9}).params.max_tokens == 7


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": MSG}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
        ({"model": "m", "messages": MSG, "top_p": 0}, "top_p"),
        ({"model": "m", "messages": MSG, "temperature": float("nan")}, "temperature"),
        ({"model": "m", "messages": MSG, "presence_penalty": 3}, "presence_penalty"),
        ({"model": "m", "messages": MSG, "stream": "yes"}, "stream"),
        ({"model": "m", "messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "m", "messages": MSG, "tools": [{"type": "function"}]}, "tools[0]"),
        ({"model": "m", "messages": MSG, "seed": 1.5}, "seed"),
    ],
)
def test_chat_rejections(body, param):
    with pytest.raises(ApiError) as e:
        parse_chat(body)
    assert e.value.status == 400 and e.value.param == param


def test_completion_and_embedding_shapes():
    assert parse_completion({"model": "m", "prompt": ["x"]}).prompt == "x"
    assert parse_embeddings({"model": "m", "input": "x"}).inputs == ("x",)
    with pytest.raises(ApiError):
        parse_embeddings({"model": "m", "input": ["x"] * 1000})
    with pytest.raises(ApiError):
        parse_embeddings({"model": "m", "input": "x", "encoding_format": "int8"})


@pytest.mark.parametrize(
    ("prompt", "prompts"),
    [
        ("x", ("x",)),
        (["x"], ("x",)),
        (["a", "b"], ("a", "b")),
        ([1, 2, 3], ((1, 2, 3),)),
        ([[1, 2], [3]], ((1, 2), (3,))),
        (["a", [7, 8]], ("a", (7, 8))),
    ],
)
def test_completion_prompt_forms(prompt, prompts):
    p = parse_completion({"model": "m", "prompt": prompt, "n": 2, "seed": 10})
    assert p.prompts == prompts and p.n_choices == 2 * len(prompts)
    last = p.request("r", p.n_choices - 1)  # choice index // n is its prompt; index % n its seed offset
    assert (last.prompt if isinstance(prompts[-1], str) else last.prompt_ids) == prompts[-1]
    assert last.params.seed == 11 and p.request("r", 2 if len(prompts) > 1 else 0).params.seed == 10


@pytest.mark.parametrize(
    "prompt",
    [[], [[]], [1.5], [True, 2], [-1], [1 << 31], [["a"]], ["x"] * 17, [None], {"a": 1}, [1] * ((1 << 17) + 1)],
)
def test_completion_prompt_rejections(prompt):
    with pytest.raises(ApiError) as e:
        parse_completion({"model": "m", "prompt": prompt})
    assert e.value.status == 400 and e.value.param == "prompt"


def test_completion_choices_are_capped():
    with pytest.raises(ApiError) as e:
        parse_completion({"model": "m", "prompt": ["a"] * 5, "n": 8})
    assert e.value.param == "n"


@pytest.mark.parametrize(
    ("value", "inputs"),
    [([5, 6], ((5, 6),)), ([[5], [6, 7]], ((5,), (6, 7))), (["a", [1]], ("a", (1,)))],
)
def test_embedding_inputs_as_ids(value, inputs):
    assert parse_embeddings({"model": "m", "input": value}).inputs == inputs


@pytest.mark.parametrize("value", [[[]], [[-3]], [[1.0]], [[True]], [[1 << 40]]])
def test_embedding_id_rejections(value):
    with pytest.raises(ApiError) as e:
        parse_embeddings({"model": "m", "input": value})
    assert e.value.status == 400 and e.value.param == "input"
