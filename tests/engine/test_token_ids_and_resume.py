"""Token-id input and a grammar resumed mid-answer, on both real engines (SmolLM2, in process): a prompt
given as ids answers as the same prompt given as text; embeddings of ids equal those of the text; ids
outside the vocabulary are refused; a JSON answer resumed from its first half under its schema
continues the object (the grammar state follows the text already sent) instead of starting over."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest
import torch

from core.errors import BadRequest
from engine.constraint import vocabulary
from engine.grammar import json_schema_grammar
from engine.llama_cpp_engine import LlamaCppEngine
from engine.model_file import load_model_file
from engine.sampling import SamplerState
from engine.torch_engine import TorchShardEngine
from engine.types import GenerationRequest, SamplingParams

PROMPT = "The capital of France is"
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16}, "city": {"type": "string", "maxLength": 16}},
    "required": ["name", "city"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_model_file("smollm2-135m-instruct")


@pytest.fixture(scope="module", params=["llama.cpp", "torch"])
def engine(request, model) -> Iterator[LlamaCppEngine | TorchShardEngine]:
    made = LlamaCppEngine(model, n_ctx=512, threads=1) if request.param == "llama.cpp" else TorchShardEngine(
        model, max_sessions=2, max_context=512)
    yield made
    made.close()


def run(engine: LlamaCppEngine | TorchShardEngine, request: GenerationRequest) -> tuple[str, list[int], str]:
    text, ids, finish = "", [], ""
    for chunk in engine.generate(request, threading.Event()):
        text += chunk.text
        ids += chunk.token_ids
        finish = str(chunk.finish_reason or finish)
    return text, ids, finish


def ids_of(engine: LlamaCppEngine | TorchShardEngine, text: str) -> list[int]:
    if isinstance(engine, LlamaCppEngine):
        return engine.tokenize_parts([(text, True)])
    return engine.tokenizer.encode_parts([(text, True)])


def test_prompt_ids_answer_as_the_text(engine):
    params = SamplingParams(temperature=0, max_tokens=8, seed=1)  # seeded: a fresh llama.cpp prefill each time
    by_text = run(engine, GenerationRequest("t", params, prompt=PROMPT))
    by_ids = run(engine, GenerationRequest("i", params, prompt_ids=tuple(ids_of(engine, PROMPT))))
    assert by_ids == by_text and len(by_text[1]) == 8


def test_prompt_ids_outside_the_vocabulary_are_refused(engine):
    bad = GenerationRequest("b", SamplingParams(max_tokens=2), prompt_ids=(1, 2, 49152))
    with pytest.raises(BadRequest, match="49152"):
        run(engine, bad)
    with pytest.raises(BadRequest, match="outside"):
        engine.embed([(1, 1 << 30)])


def test_embeddings_of_ids_equal_those_of_the_text(engine):
    text = "hello world, embeddings"
    if isinstance(engine, TorchShardEngine):
        ids = tuple(engine.tokenizer.encode_parts([(text, False)]))
    else:  # as llama-cpp-python's embed tokenises text: BOS always, no special tokens
        ids = tuple(engine._llm.tokenize(text.encode(), add_bos=True, special=False))
    by_text, by_ids = engine.embed([text, ids])
    assert len(by_ids) == len(by_text)
    assert sum(a * b for a, b in zip(by_text, by_ids, strict=True)) == pytest.approx(1.0, abs=1e-5)


def test_a_grammar_resumes_from_the_text_already_sent(engine):
    grammar = json_schema_grammar(SCHEMA)
    params = SamplingParams(temperature=0, max_tokens=40, grammar=grammar, seed=3)
    messages = ({"role": "user", "content": "Give a person's name and city as JSON."},)
    whole, _, finish = run(engine, GenerationRequest("w", params, messages=messages))
    assert finish == "stop"
    json.loads(whole)
    half = whole[: len(whole) // 2]  # cut inside the object, as a holder dying mid-answer would
    resumed = GenerationRequest("r", params, messages=messages, continuation=half)
    rest, _, finish = run(engine, resumed)
    assert finish == "stop", (half, rest)
    assert set(json.loads(half + rest)) == {"name", "city"}  # one object: the grammar did not start over


def test_a_resumed_matcher_allows_only_what_continues_the_text(model):
    """The unit under the engines: after `resume`, the mask is the grammar's mask after that text."""
    vocab = vocabulary(model.path)
    state = SamplerState(SamplingParams(temperature=0, grammar=json_schema_grammar(SCHEMA)), vocabulary=vocab)
    fresh = torch.zeros(vocab.vocab_size)
    state.process(fresh)
    opening = vocab.tokenize_str('{"')[0]
    assert fresh[opening] == 0  # a fresh matcher expects the object to open
    state.resume(vocab.tokenize_str('{"name":"Al","city":"Paris"'))
    row = torch.zeros(vocab.vocab_size)
    state.process(row)
    allowed = [t for t in range(vocab.vocab_size) if row[t] == 0]
    assert allowed and not state.dead_end
    # both keys are in: only the closing brace (a fresh matcher would want the object to open)
    assert all(vocab.decode_bytes([t]).startswith(b"}") for t in allowed), [vocab.decode_str([t]) for t in allowed[:5]]
    bad = SamplerState(SamplingParams(temperature=0, grammar=json_schema_grammar(SCHEMA)), vocabulary=vocab)
    bad.resume(vocab.tokenize_str("not json"))
    assert bad.dead_end  # a continuation the grammar cannot take ends the answer ("length"), never a hang
