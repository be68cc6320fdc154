"""Property-based fuzzing of the OpenAI request parsers: any JSON body, including the right keys with
wrong values, is a parsed request or a clean 400-class refusal (`ApiError`), never another exception."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import ApiError
from gateway.openai_requests import parse_chat, parse_completion, parse_embeddings

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=25,
)
KEYS = ["model", "messages", "prompt", "input", "max_tokens", "max_completion_tokens", "temperature", "top_p",
        "top_k", "min_p", "stop", "seed", "stream", "stream_options", "n", "presence_penalty",
        "frequency_penalty", "logprobs", "tools", "response_format", "user", "role", "content",
        "encoding_format", "dimensions", "return_token_ids"]
message = st.dictionaries(st.sampled_from(["role", "content", "name"]), json_values, max_size=3)
bodies = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=8),
    st.fixed_dictionaries({"model": st.text(max_size=20), "messages": st.lists(message, max_size=3)},
                          optional={"max_tokens": json_values, "stop": json_values, "temperature": json_values}),
)


@SETTINGS
@given(bodies)
def test_parsers_refuse_bad_bodies_with_an_api_error(body: object) -> None:
    for parse in (parse_chat, parse_completion, parse_embeddings):
        try:
            parse(body)
        except ApiError as e:
            assert 400 <= e.status < 500
