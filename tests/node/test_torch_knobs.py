"""The torch engine's knobs from the command line: --weights, --kv-sessions, --kv-dtype reach the
budget's arithmetic and are validated."""

from __future__ import annotations

import pytest
from conftest import model_file

from node.config import NodeConfig
from node.model_loader import torch_shard_bytes
from shard.spec import ShardSpec


@pytest.mark.parametrize(
    ("field", "value"), [("kv_dtype", "8"), ("kv_sessions", 0), ("weights", "int3"), ("int4_kernel", "marlin")]
)
def test_bad_knobs_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError):
        NodeConfig(mesh_secret="s", **{field: value})  # type: ignore[arg-type]


def test_knobs_change_what_the_budget_counts() -> None:
    model = model_file("smollm2-135m-instruct")
    spec = ShardSpec.whole_model(model.digest, model.n_layers)

    def need(**kw: object) -> int:
        return torch_shard_bytes(model, spec, NodeConfig(mesh_secret="s", **kw), 2048)  # type: ignore[arg-type]

    kv_16 = 30 * 2048 * 2 * 192 * 2  # layers x tokens x (k, v) x kv width x 2 bytes, per session
    assert need(kv_sessions=2) - need(kv_sessions=1) == kv_16 + 49152 * 4  # and its logits buffer
    assert need(kv_sessions=1, kv_dtype="32") - need(kv_sessions=1) == kv_16
    assert need(weights="full") > 5 * need(weights="quantized") - 5 * 4 * kv_16


def test_the_int4_kernel_follows_the_width_a_node_is_sized_for() -> None:
    from engine.linear import int4_kernel_for
    from node.cli import build_parser

    assert int4_kernel_for("auto", 4) == "tinygemm"  # the default node: one stream first
    assert int4_kernel_for("auto", 8) == "triton"
    assert int4_kernel_for("auto", 1, overlapped_launch=True) == "triton"  # PDL overlaps Triton's launches
    assert int4_kernel_for("tinygemm", 64) == "tinygemm" and int4_kernel_for("triton", 1) == "triton"
    with pytest.raises(ValueError):
        int4_kernel_for("marlin", 4)
    args = build_parser().parse_args(["node", "join", "--int4-kernel", "triton"])
    assert args.int4_kernel == "triton"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["node", "join", "--int4-kernel", "marlin"])
