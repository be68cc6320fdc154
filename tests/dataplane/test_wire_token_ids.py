"""Token ids on the data plane's wire: a completion prompt and embeddings inputs as ids round-trip, and
a peer's malformed ids are refused at the boundary (before any engine reads them)."""

from __future__ import annotations

import pytest

from dataplane import rpc
from dataplane.wire import decode_embed_request, decode_request, encode_request
from engine.types import GenerationRequest, SamplingParams

DIGEST = "ab" * 32


def test_prompt_ids_round_trip():
    request = GenerationRequest("r", SamplingParams(max_tokens=3), prompt_ids=(1, 2, 49151), continuation="x")
    digest, back = decode_request(rpc.unpack_map(rpc.pack(encode_request(DIGEST, request))))
    assert digest == DIGEST and back == request


@pytest.mark.parametrize("ids", [[], [-1], [1.0], [True], [1 << 31], "12", [[1]], [1] * ((1 << 17) + 1)])
def test_bad_prompt_ids_are_refused(ids):
    frame = encode_request(DIGEST, GenerationRequest("r", SamplingParams(), prompt_ids=(1,)))
    frame["prompt_ids"] = ids
    with pytest.raises(rpc.PayloadError):
        decode_request(frame)


def test_prompt_and_prompt_ids_together_are_refused():
    frame = encode_request(DIGEST, GenerationRequest("r", SamplingParams(), prompt="a"))
    frame["prompt_ids"] = [1]
    with pytest.raises(rpc.PayloadError):
        decode_request(frame)


def test_embed_inputs_as_ids():
    assert decode_embed_request({"model": DIGEST, "input": ["a", [1, 2]]}) == (DIGEST, ["a", (1, 2)])
    for bad in ([[]], [[-1]], [["a"]], [[1.5]]):
        with pytest.raises(rpc.PayloadError):
            decode_embed_request({"model": DIGEST, "input": bad})
