"""engine/pdl.py: programmatic dependent launch only where it can run (CUDA sm_90+, a Triton that has
it, not under the interpreter, not turned off), and every kernel that takes the flag waits before it
reads. The launches themselves run on the H200 in test_torch_cuda.py and test_int4_triton.py, whose
parity checks run with PDL on."""

from __future__ import annotations

import ast
from pathlib import Path

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


# kernels that may read before their PDL wait, and what: weights, which no kernel before them writes
EARLY_LOADS = {"_gemv_kernel": {"W"}}


def _jit_kernels_with_pdl() -> list[tuple[str, ast.FunctionDef]]:
    found = []
    for path in sorted(Path(__file__).resolve().parents[2].joinpath("engine").glob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef) and any(a.arg == "PDL" for a in fn.args.args + fn.args.kwonlyargs):
                if any("jit" in ast.unparse(d) for d in fn.decorator_list) and not fn.name.endswith("pdl_prologue"):
                    found.append((f"{path.name}:{fn.name}", fn))
    return found


def test_every_kernel_with_a_pdl_flag_waits_before_it_reads() -> None:
    """A kernel launched with launch_pdl=True that reads before `griddepcontrol.wait` races the kernel
    before it: every jit kernel taking `PDL` calls `pdl_prologue(PDL)` as its first statement, or
    loads only the weights named in EARLY_LOADS before it."""
    kernels = _jit_kernels_with_pdl()
    assert len(kernels) >= 10, [k for k, _ in kernels]  # norm, act, gemv, 3 attention, 4 int4 kernels, Gluon int4
    for where, fn in kernels:
        body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        at = [i for i, s in enumerate(body) if "pdl_prologue(PDL)" in ast.unparse(s)]
        assert len(at) == 1, f"{where} does not call pdl_prologue(PDL) exactly once at its top level"
        allowed = EARLY_LOADS.get(fn.name, set())
        for stmt in body[: at[0]]:
            for call in (n for n in ast.walk(stmt) if isinstance(n, ast.Call)):
                if ast.unparse(call.func) in ("tl.load", "tl.atomic_add"):
                    base = call.args[0]
                    while isinstance(base, ast.BinOp):  # the pointer is base + offsets: find the base
                        base = base.left
                    name = base.id if isinstance(base, ast.Name) else ast.unparse(base)
                    assert name in allowed, f"{where} reads {name} before its PDL wait"
        assert allowed or at[0] == 0, f"{where}: pdl_prologue(PDL) is not its first statement"
