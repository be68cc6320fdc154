"""A GGUF with an unsupported or corrupt tensor: one line naming the tensor and its type, and the node
keeps serving its other models (torch engine: layer ranges are loaded as stored, so the loader is
where a type the engine cannot run is caught)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from scripts.synthetic_gguf import write_synthetic_llama


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    # an IQ4_NL ffn_up: a real GGUF type (llama.cpp runs it) that this engine does not
    unsupported = write_synthetic_llama(d / "iq4.gguf", "tiny-512", "Q4_K", mix="Q4_K_M", iq4_nl_tensor="blk.1.ffn_up")
    # a norm whose bytes are NaN: a corrupt file
    corrupt = write_synthetic_llama(d / "nan.gguf", "tiny-512", "Q4_K", mix="Q4_K_M")
    from shard.gguf_index import open_index

    t = open_index(corrupt).tensors["blk.0.attn_norm.weight"]
    with open(corrupt, "r+b") as f:
        f.seek(t.offset)
        f.write(np.full(t.n_elements, np.nan, dtype=np.float32).tobytes())
    return {"unsupported": unsupported, "corrupt": corrupt}


@pytest.fixture(scope="module")
def nodes(module_node_factory, bad_files):
    """One node per bad file, started together: each serves SmolLM2 and is told to load its bad file too."""
    return module_node_factory.many({which: ("--model", "smollm2-135m-instruct", "--shard", f"{path}:0-4",
                                             "--threads", "1") for which, path in bad_files.items()})


@pytest.mark.parametrize(
    ("which", "expected"),
    [("unsupported", "blk.1.ffn_up.weight has type IQ4_NL"), ("corrupt", "blk.0.attn_norm.weight: values are not finite")],
)
def test_node_names_the_tensor_and_serves_its_other_model(nodes, which, expected):
    node = nodes[which]
    models = json.loads(urllib.request.urlopen(node.url + "/v1/models", timeout=30).read())
    assert [m["id"] for m in models["data"]] == ["smollm2-135m-instruct"]
    errors = [line for line in node.output if "not serving" in line]
    assert len(errors) == 1 and expected in errors[0], node.output
    reply = _post(node.url + "/v1/completions",
                  {"model": "smollm2-135m-instruct", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert reply["usage"]["completion_tokens"] >= 1
