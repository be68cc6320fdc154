"""engine/pdl.py: programmatic dependent launch only where it can run (CUDA sm_90+, a Triton that has
it, not under the interpreter, not turned off), and the kernels' prologue a no-op without it. The
launches themselves are covered on the H200 by test_torch_cuda.py and test_int4_triton.py, whose
parity checks run with PDL on."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine import pdl  # noqa: E402


def test_no_pdl_off_cuda() -> None:
    assert not pdl.enabled(torch.device("cpu"))
    assert pdl.launch_options(torch.device("cpu")) == {"PDL": False}  # no launch_pdl keyword at all


def test_the_switch_and_the_interpreter_turn_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pdl, "_supported", lambda index: True)  # as on an H200
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("MESHLLM_PDL", raising=False)
    cuda = torch.device("cuda", 0)
    assert pdl.launch_options(cuda) == {"PDL": True, "launch_pdl": True}
    monkeypatch.setenv("MESHLLM_PDL", "0")
    assert not pdl.enabled(cuda)
    monkeypatch.setenv("MESHLLM_PDL", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter has no grid dependency control
    assert not pdl.enabled(cuda)
