"""The torch engine's knobs from the command line: --weights, --kv-sessions, --kv-dtype reach the
budget's arithmetic and are validated."""

from __future__ import annotations

import pytest

from engine.model_file import load_model_file
from node.config import NodeConfig
from node.model_loader import torch_shard_bytes
from shard.spec import ShardSpec


@pytest.mark.parametrize(("field", "value"), [("kv_dtype", "8"), ("kv_sessions", 0), ("weights", "int3")])
def test_bad_knobs_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError):
        NodeConfig(mesh_secret="s", **{field: value})  # type: ignore[arg-type]


def test_knobs_change_what_the_budget_counts() -> None:
    model = load_model_file("smollm2-135m-instruct")
    spec = ShardSpec.whole_model(model.digest, model.n_layers)

    def need(**kw: object) -> int:
        return torch_shard_bytes(model, spec, NodeConfig(mesh_secret="s", **kw), 2048)  # type: ignore[arg-type]

    kv_16 = 30 * 2048 * 2 * 192 * 2  # layers x tokens x (k, v) x kv width x 2 bytes, per session
    assert need(kv_sessions=2) - need(kv_sessions=1) == kv_16 + 49152 * 4  # and its logits buffer
    assert need(kv_sessions=1, kv_dtype="32") - need(kv_sessions=1) == kv_16
    assert need(weights="full") > 5 * need(weights="quantized") - 5 * 4 * kv_16
