"""The shard memory estimate: arithmetic, figures from the GGUF's tensor table, and agreement with
the measured memory of a loaded shard (RSS on CPU; torch.cuda.memory_allocated on CUDA)."""

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from conftest import model_file

from shard.footprint import model_weight_bytes
from shard.gguf_index import open_index
from shard.loader import read_model_config
from shard.memory import WeightBytes, estimate_shard_bytes
from shard.spec import ShardSpec

W = WeightBytes(layers=(10, 20, 30, 40), embed=100, head=105, head_shares_embed=True)


@pytest.fixture(scope="module")
def model():
    return model_file("smollm2-135m-instruct")


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        (0, 4, 10 + 20 + 30 + 40 + 100 + 105 - 100),  # whole and tied: the embedding is held once
        (0, 2, 10 + 20 + 100),
        (1, 3, 20 + 30),
        (2, 4, 30 + 40 + 105),  # a last stage holds its own head (and output norm)
    ],
)
def test_weight_bytes_by_range(start: int, end: int, expected: int) -> None:
    assert W.shard_bytes(ShardSpec("m", start, end, 4)) == expected


def test_weight_bytes_reject_nonsense() -> None:
    with pytest.raises(ValueError):
        WeightBytes(layers=(), embed=1, head=1, head_shares_embed=False)
    with pytest.raises(ValueError):
        WeightBytes(layers=(1,), embed=10, head=5, head_shares_embed=True)
    with pytest.raises(ValueError):
        W.shard_bytes(ShardSpec("m", 0, 2, 5))


def test_kv_and_totals(model) -> None:
    c = read_model_config(model.path)
    spec = ShardSpec(model.digest, 10, 20, 30)
    m = estimate_shard_bytes(c, spec, W_30(), kv_dtype_bytes=2, context_tokens=1000, n_sessions=3)
    assert m.kv_bytes == 10 * 3 * 1000 * (2 * 3 * 64 * 2)
    assert m.total == m.weights_bytes + m.kv_bytes + m.other_bytes
    with pytest.raises(ValueError):
        estimate_shard_bytes(c, spec, W_30(), kv_dtype_bytes=2, context_tokens=0, n_sessions=1)


def W_30() -> WeightBytes:  # noqa: N802 - a builder
    return WeightBytes(layers=(1,) * 30, embed=1, head=1, head_shares_embed=False)


def test_quantized_figures_are_the_files_bytes(model) -> None:
    """SmolLM2 Q4_1 (98 MB file): quantized on CPU it holds its stored bytes; dequantized, 5x more."""
    q = model_weight_bytes(model.path, 30, "quantized", "cpu")
    tensor_bytes = sum(t.n_bytes for t in open_index(model.path).tensors.values())
    whole = q.shard_bytes(ShardSpec.whole_model(model.digest, 30))
    assert whole == tensor_bytes  # every tensor once; norms are F32 already
    full = model_weight_bytes(model.path, 30, "full", "cpu").shard_bytes(ShardSpec.whole_model(model.digest, 30))
    assert full == 134_515_008 * 4  # 134.5M parameters in fp32, the tied embedding once
    assert full / whole > 5
    cuda = model_weight_bytes(model.path, 30, "quantized", "cuda")
    assert cuda.layers[0] < q.layers[0] * 1.3  # int4 + bf16 scale/zero per 32 vs Q4_1's fp16 pair
    assert not cuda.head_shares_embed and q.head_shares_embed


_MEASURE = """
import gc, json, sys, torch
from engine.model_file import load_model_file
from engine.torch_engine import TorchShardEngine
from shard.footprint import model_weight_bytes
from shard.loader import read_model_config
from shard.memory import estimate_shard_bytes
from shard.spec import ShardSpec

start, end, ctx, sessions, form = sys.argv[1:]

def rss():
    # quantized weights are the GGUF's mapped pages (VmRSS counts them); dequantized ones are
    # anonymous memory, and the mapped pages read to make them are reclaimable cache
    key = "VmRSS:" if form == "quantized" else "RssAnon:"
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

torch.set_num_threads(1)
model = load_model_file("smollm2-135m-instruct")
config = read_model_config(model.path)  # parse metadata before the baseline
spec = ShardSpec(model.digest, int(start), int(end), config.n_layers)
import engine.ggml_cpu, engine.tokenizer, engine.linear; engine.ggml_cpu._lib()
gc.collect()
before = rss()
e = TorchShardEngine(model, spec=spec, max_sessions=int(sessions), max_context=int(ctx), weights=form,
                     threads=1)
for kc, vc in zip(e.shard.kv.k, e.shard.kv.v):  # pages count once touched: touch them as a full run would
    kc.fill_(1); vc.fill_(1)
x = torch.arange(8) if spec.is_first else torch.zeros(8, config.hidden_size)
e.open_session("s")
e.prefill_stage("s", x, 0)  # reads every weight of the range once
gc.collect()
w = model_weight_bytes(model.path, config.n_layers, form, "cpu")
est = estimate_shard_bytes(config, spec, w, kv_dtype_bytes=2, context_tokens=int(ctx), n_sessions=int(sessions))
print(json.dumps({"measured": rss() - before, "estimate": est.total}))
"""


MEASURED = [(0, 30, 2048, 2, "quantized"), (10, 20, 1024, 4, "quantized"), (22, 30, 512, 2, "full")]


@pytest.fixture(scope="module")
def measuring() -> Iterator[dict[tuple, subprocess.Popen]]:
    """The three measurements, each a process of its own (RSS is per process), started together with
    the first of their tests: they overlap on the two cores instead of taking turns."""
    procs = {case: subprocess.Popen([sys.executable, "-c", _MEASURE, *map(str, case)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for case in MEASURED}
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.parametrize(("start", "end", "ctx", "sessions", "form"), MEASURED)
def test_estimate_matches_measured_rss(measuring, start: int, end: int, ctx: int, sessions: int, form: str) -> None:
    """The whole model touches its tied embedding as the head, so every byte counted is resident."""
    proc = measuring[(start, end, ctx, sessions, form)]
    stdout, stderr = proc.communicate(timeout=180)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, stdout, stderr)
    r = json.loads(stdout.strip().splitlines()[-1])
    # the tokenizer (a llama.cpp vocab-only model) and allocator slack come on top of the estimate
    assert abs(r["measured"] - r["estimate"]) <= 0.15 * r["estimate"] + 40 * 2**20, r


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("start", "end"), [(0, 4), (1, 3), (2, 4)])
def test_cuda_estimate_matches_memory_allocated(tmp_path, start: int, end: int) -> None:
    """A Q4_K_M-like file (4-bit q/k/o/gate/up as int4, 6-bit v/down as bf16): the GPU holds what the
    estimate says, less the embedding table, whose rows are dequantized on the host."""
    from engine.linear import LinearFactory
    from engine.torch_model import ShardModel
    from scripts.synthetic_gguf import write_synthetic_llama
    from shard.loader import load_shard

    path = write_synthetic_llama(tmp_path / "tiny.gguf", "tiny-512", "Q4_K", tokenizer=False, mix="Q4_K_M")
    config = read_model_config(path)
    spec = ShardSpec("tiny", start, end, config.n_layers)
    dev = torch.device("cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    model = ShardModel(load_shard(path, spec), LinearFactory("quantized", dev, torch.bfloat16, None),
                       max_sessions=2, max_context=1024)
    used = torch.cuda.memory_allocated() - before
    w = model_weight_bytes(path, config.n_layers, "quantized", "cuda")
    est = estimate_shard_bytes(config, spec, w, kv_dtype_bytes=2, context_tokens=1024, n_sessions=2)
    on_device = est.weights_bytes - (w.embed if spec.is_first else 0) + est.kv_bytes
    assert abs(used - on_device) <= 0.05 * on_device + 2**20, (used, on_device)  # + RoPE tables
    del model
