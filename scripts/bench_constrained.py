"""Decode speed with and without a JSON schema (constrained decoding), both sides in one run, alternating.

    .venv/bin/python -m scripts.bench_constrained [--tokens 64] [--rounds 5] [--engine llama.cpp|pipeline|both]

Each round generates `--tokens` tokens plain and under a schema (EOS biased away on both sides, so both
run the full count) and prints tok/s per side and the ratio constrained/plain, with the load average
before and after (the figure means little on a loaded box).
- llama.cpp: the whole-model engine's own `generate`.
- pipeline: a 2-stage chain of torch layer ranges ([0, 15) and [15, 30)) driven in process as stage 0
  drives it (hidden states onward, the token back), the last stage sampling with the code the stage
  service runs (`sampler_state` + `sample` + `TokenOutput.push_sampled`), the grammar's matcher built
  per request as there. No gRPC hop: the hop does not change with a grammar, and leaving it out keeps
  the ratio from drowning in the 2-core box's scheduling noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable

import torch

from engine.grammar import json_schema_grammar
from engine.llama_cpp_engine import LlamaCppEngine
from engine.model_file import ModelFile, load_model_file, resolve_path
from engine.sampling import sample
from engine.token_output import TokenOutput
from engine.torch_engine import TorchShardEngine
from engine.torch_generate import prompt_tokens, sampler_state
from engine.types import GenerationRequest, SamplingParams
from shard.spec import ShardSpec

SCHEMA = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
MESSAGES = ({"role": "user", "content": "Tell me a long story about a lighthouse keeper, as JSON."},)


_COUNTS: list[int] = []  # tokens of each timed run, plain and schema alternating


def _run(engine: LlamaCppEngine, params: SamplingParams) -> float:
    started = time.perf_counter()
    chunks = list(engine.generate(GenerationRequest("bench", params, messages=MESSAGES), threading.Event()))
    elapsed = time.perf_counter() - started
    _COUNTS.append(chunks[-1].usage.completion_tokens)
    return chunks[-1].usage.completion_tokens / elapsed


def _pipeline(model: ModelFile, split: int) -> Callable[[SamplingParams], float]:
    stages = [TorchShardEngine(model, spec=ShardSpec(model.digest, a, b, model.n_layers), max_sessions=1,
                               max_context=1024) for a, b in ((0, split), (split, model.n_layers))]
    request = GenerationRequest("bench", SamplingParams(), messages=MESSAGES)
    ids = prompt_tokens(stages[0], request)

    def run(params: SamplingParams) -> float:
        started = time.perf_counter()
        sid = uuid.uuid4().hex
        for e in stages:
            e.open_session(sid)
        try:
            state = sampler_state(params, model.path, stages[-1].device)  # as the last stage builds it
            output = TokenOutput(stages[-1].tokenizer, params.stop, len(ids), params.max_tokens or 64)
            x, pos = torch.tensor(ids), 0
            while True:
                h = x
                for e in stages:
                    h = e.prefill_stage(sid, h, pos)
                pos += x.shape[0]
                token = sample([state], h)[0]
                if output.push_sampled(token, state).finish_reason is not None:
                    break
                x = torch.tensor([token])
        finally:
            for e in stages:
                e.close_session(sid)
        _COUNTS.append(output.n_out)
        return output.n_out / (time.perf_counter() - started)

    return run


def _compare(name: str, run: Callable[[SamplingParams], float], base: SamplingParams,
             constrained: SamplingParams, rounds: int) -> None:
    run(base)  # warm-up: page in the weights, build the grammar tokenizer
    run(constrained)
    _COUNTS.clear()
    load = os.getloadavg()[0]
    plain, masked = [], []
    for _ in range(rounds):
        plain.append(run(base))
        masked.append(run(constrained))
    p, m = statistics.median(plain), statistics.median(masked)
    counts = f"tokens per run plain {sorted(set(_COUNTS[0::2]))}, schema {sorted(set(_COUNTS[1::2]))}"
    _COUNTS.clear()
    print(f"engine {name}: plain {p:.1f} tok/s, JSON schema {m:.1f} tok/s (medians of {rounds}); "
          f"ratio {m / p:.3f} (cost {100 * (1 - m / p):.1f}%); load average {load:.2f} -> {os.getloadavg()[0]:.2f}; "
          f"{counts}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engine", choices=["llama.cpp", "pipeline", "both"], default="both")
    args = parser.parse_args()
    model = load_model_file(resolve_path("smollm2-135m-instruct")[0])
    eog = [0, 1, 2]  # SmolLM2's <|endoftext|>, <|im_start|>, <|im_end|>: both sides run the full count
    base = SamplingParams(temperature=0.8, seed=1, max_tokens=args.tokens, logit_bias=tuple((t, -100.0) for t in eog))
    constrained = SamplingParams(**{**{f: getattr(base, f) for f in base.__slots__}, "grammar": json_schema_grammar(SCHEMA)})
    if args.engine in ("llama.cpp", "both"):
        engine = LlamaCppEngine(model, n_ctx=2048, threads=args.threads)
        _compare("llama.cpp", lambda p: _run(engine, p), base, constrained, args.rounds)
        engine.close()
    if args.engine in ("pipeline", "both"):
        torch.set_num_threads(args.threads)
        _compare("2-stage torch pipeline", _pipeline(model, model.n_layers // 2), base, constrained, args.rounds)


if __name__ == "__main__":
    main()
