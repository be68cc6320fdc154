"""The shard memory estimate: arithmetic, and agreement with the measured memory of a loaded shard."""

import json
import subprocess
import sys

import pytest

from engine.model_file import load_model_file
from shard.loader import read_model_config
from shard.memory import estimate_shard_bytes, shard_weight_params
from shard.spec import ShardSpec


@pytest.fixture(scope="module")
def model():
    return load_model_file("smollm2-135m-instruct")


def test_whole_model_params_match_the_gguf(model) -> None:
    # SmolLM2-135M: 134.5M parameters with the tied embedding counted once
    c = read_model_config(model.path)
    assert shard_weight_params(c, ShardSpec.whole_model(model.digest, 30)) == 134_515_008


@pytest.mark.parametrize(
    ("start", "end", "embeddings"),  # embedding-sized tensors the shard holds
    [(0, 30, 1), (0, 10, 1), (10, 20, 0), (20, 30, 1)],
)
def test_stage_terms(model, start: int, end: int, embeddings: int) -> None:
    c = read_model_config(model.path)
    spec = ShardSpec(model.digest, start, end, 30)
    m = estimate_shard_bytes(c, spec, dtype_bytes=2, context_tokens=1000, n_sessions=3)
    norm = c.hidden_size if spec.is_last else 0
    assert m.weights_bytes == 2 * ((end - start) * c.layer_params() + embeddings * 49152 * 576 + norm)
    assert m.kv_bytes == 2 * (end - start) * 3 * 1000 * 3 * 64 * 2
    assert m.total == m.weights_bytes + m.kv_bytes + m.other_bytes


def test_rejects_nonsense(model) -> None:
    c = read_model_config(model.path)
    with pytest.raises(ValueError):
        estimate_shard_bytes(c, ShardSpec(model.digest, 0, 1, 30), 4, 0, 1)


_MEASURE = """
import gc, json, sys, torch
from shard.loader import open_reader, read_model_config, load_shard
from shard.memory import estimate_shard_bytes
from shard.spec import ShardSpec
from engine.torch_model import ShardModel

def anon():  # resident anonymous memory: our tensors, not the GGUF's file-backed pages
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

path, digest, start, end, ctx, sessions = sys.argv[1:]
torch.set_num_threads(1)
config = read_model_config(path)  # parse metadata before the baseline
spec = ShardSpec(digest, int(start), int(end), config.n_layers)
gc.collect()
before = anon()
model = ShardModel(load_shard(path, spec), max_sessions=int(sessions), max_context=int(ctx))
gc.collect()
est = estimate_shard_bytes(config, spec, 4, int(ctx), int(sessions))
print(json.dumps({"measured": anon() - before, "estimate": est.total}))
"""


@pytest.mark.parametrize(("start", "end", "ctx", "sessions"), [(0, 10, 1024, 4), (22, 30, 2048, 2)])
def test_estimate_matches_measured_rss(model, start: int, end: int, ctx: int, sessions: int) -> None:
    args = [model.path, model.digest, str(start), str(end), str(ctx), str(sessions)]
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, timeout=120, check=True
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(r["measured"] - r["estimate"]) <= 0.15 * r["estimate"] + 32 * 2**20, r
