"""Decode speed with and without a JSON schema (constrained decoding), both sides in one run, alternating.

    .venv/bin/python -m scripts.bench_constrained [--tokens 64] [--rounds 5]

Each round generates `--tokens` tokens with the llama.cpp engine plain and under a schema (EOS biased
away on both sides, so both run the full count). Prints tok/s per side and the ratio
constrained/plain. (The pipeline's side is still to add: its last stage runs the same `sample`.)
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from engine.grammar import json_schema_grammar
from engine.llama_cpp_engine import LlamaCppEngine
from engine.model_file import load_model_file, resolve_path
from engine.types import GenerationRequest, SamplingParams

SCHEMA = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
MESSAGES = ({"role": "user", "content": "Tell me a long story about a lighthouse keeper, as JSON."},)


def _run(engine: LlamaCppEngine, params: SamplingParams) -> float:
    started = time.perf_counter()
    chunks = list(engine.generate(GenerationRequest("bench", params, messages=MESSAGES), threading.Event()))
    elapsed = time.perf_counter() - started
    return chunks[-1].usage.completion_tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    engine = LlamaCppEngine(load_model_file(resolve_path("smollm2-135m-instruct")[0]), n_ctx=2048, threads=args.threads)
    eog = [0, 1, 2]  # SmolLM2's <|endoftext|>, <|im_start|>, <|im_end|>: both sides run the full count
    base = SamplingParams(temperature=0.8, seed=1, max_tokens=args.tokens, logit_bias=tuple((t, -100.0) for t in eog))
    constrained = SamplingParams(**{**{f: getattr(base, f) for f in base.__slots__}, "grammar": json_schema_grammar(SCHEMA)})
    _run(engine, base)  # warm-up: page in the weights, build the grammar tokenizer
    _run(engine, constrained)
    plain, masked = [], []
    for _ in range(args.rounds):
        plain.append(_run(engine, base))
        masked.append(_run(engine, constrained))
    p, m = statistics.median(plain), statistics.median(masked)
    print(f"engine llama.cpp: plain {p:.1f} tok/s, JSON schema {m:.1f} tok/s (medians of {args.rounds}); "
          f"ratio {m / p:.3f} (cost {100 * (1 - m / p):.1f}%)")


if __name__ == "__main__":
    main()
