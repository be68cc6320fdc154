"""The Triton kernels' checks on CPU by Triton's interpreter (TRITON_INTERPRET=1, switched on at import,
so each check is a script run in a subprocess), run in the background.

Each takes one core for a few seconds. The engine tests leave one core free (torch.set_num_threads(1)),
so tests/conftest.py starts the checks this session will run at its first test under tests/engine/, one
after another (more at once would slow the engine tests), and each check's test reads what its script
printed (a test run without them runs its own then).
A unique module name: tests/ has no __init__.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENGINE_TESTS = REPO / "tests" / "engine"

KERNEL_CHECK = """
import torch
from engine.kv_cache import PagedKVCache
from engine.paged_attention import decode_attention_dense
from engine.paged_attention_triton import paged_decode

g = torch.Generator().manual_seed(0)
worst = 0.0
for heads, kv_heads, dim, block, dtype in [(4, 2, 16, 16, torch.float32), (9, 3, 64, 32, torch.float16),
                                           (4, 1, 256, 32, torch.float16)]:  # the interpreter has no bf16
    kv = PagedKVCache(1, kv_heads, dim, max_sessions=4, max_context=640, pool_tokens=2048, block_size=block,
                      device=torch.device("cpu"), dtype=dtype)
    kv.k[0].copy_(torch.randn(kv.k[0].shape, generator=g))
    kv.v[0].copy_(torch.randn(kv.v[0].shape, generator=g))
    slots, pos = [3, 0, 1, 4], [0, 600, 16, 0]  # slot 4: the pad row
    for s, p in zip(slots[:3], pos, strict=False):
        kv.ensure(s, p + 1)
    stale = kv.write_index(0, 601, 608)  # past slot 0's end, in its last block: an earlier owner's NaN
    kv.k[0].flatten(0, 1)[stale] = float("nan")
    kv.v[0].flatten(0, 1)[stale] = float("nan")
    q = torch.randn(4, heads, dim, generator=g).to(dtype)
    lens = torch.tensor(pos) + 1
    for window in (0, 7, 512):
        a = paged_decode(q, kv.k[0], kv.v[0], kv.table[slots].int(), lens.int(), window=window, scale=0.2)
        b = decode_attention_dense(q, kv.k[0], kv.v[0], kv.table[slots], lens, window=window, scale=0.2)
        worst = max(worst, (a.float() - b.float()).abs().max().item())

from engine.arch_llama import rope
from engine.paged_attention_triton import rope_and_cache
from engine.torch_model import rope_table

for interleaved in (True, False):  # RoPE fused with the cache write, against torch's rope + index_copy
    kv = PagedKVCache(1, 2, 64, max_sessions=2, max_context=64, pool_tokens=128, block_size=16,
                      device=torch.device("cpu"), dtype=torch.float32)
    cos, sin = rope_table(10000.0, 64, 64, 1.0, None, torch.device("cpu"), torch.float32, interleaved=interleaved)
    q, k, v = torch.randn(3, 6, 64, generator=g), torch.randn(3, 2, 64, generator=g), torch.randn(3, 2, 64, generator=g)
    pos, write = torch.tensor([5, 0, 63]), torch.tensor([17, 3, 100])
    q1 = rope_and_cache(q, k, v, cos, sin, pos, write, kv.k[0], kv.v[0], interleaved)
    c, s_ = cos[pos][:, None], sin[pos][:, None]
    worst = max(worst, (q1 - rope(q, c, s_, interleaved)).abs().max().item())
    worst = max(worst, (kv.k[0].flatten(0, 1)[write] - rope(k, c, s_, interleaved)).abs().max().item())
    worst = max(worst, (kv.v[0].flatten(0, 1)[write] - v).abs().max().item())
print(worst)
"""


FUSED_CHECK = """
import torch
import torch.nn.functional as F
from engine.fused_triton import act_mul, add_rms_norm

g = torch.Generator().manual_seed(0)
worst = 0.0
for n in (576, 640, 4096):
    h, d = torch.randn(3, 2, n, generator=g).half(), torch.randn(3, 2, n, generator=g).half()
    w = (1 + 0.1 * torch.randn(n, generator=g)).half()
    ho, xo = add_rms_norm(h, d, w, 1e-6)
    s = (h + d)
    worst = max(worst, (ho.float() - s.float()).abs().max().item())
    worst = max(worst, (xo.float() - F.rms_norm(s.float(), (n,), w.float(), 1e-6)).abs().max().item())
    gu = torch.randn(3, 2 * n, generator=g).half()
    gate, up = gu.split(n, -1)  # views, as the gate_up projection returns them
    for act, ref in (("silu", F.silu(gate.float())), ("gelu_tanh", F.gelu(gate.float(), approximate="tanh"))):
        worst = max(worst, (act_mul(gate, up, act).float() - ref * up.float()).abs().max().item())
print(worst)
"""


GEMV_CHECK = r"""
import torch, torch.nn.functional as F
from engine.gemv_triton import gemv
torch.manual_seed(0)
for n, k in [(96, 576), (4104, 96), (40, 1536)]:  # K not a multiple of the 512 tile; N of no tile; N > 4096
    x = torch.randn(k).half()
    w = (torch.randn(n, k) * 0.05).half()
    y = gemv(x, w)
    assert y.shape == (n,) and y.dtype == torch.float16
    torch.testing.assert_close(y.float(), w.float() @ x.float(), atol=2e-3, rtol=2e-3)
    f = n // 2
    g, u = w.float()[:f] @ x.float(), w.float()[f:] @ x.float()
    for act, ref in (("silu", F.silu(g) * u), ("gelu_tanh", F.gelu(g, approximate="tanh") * u)):
        torch.testing.assert_close(gemv(x, w, act).float(), ref, atol=2e-3, rtol=2e-3)
print("ok")
"""

SCRIPTS = {"gemv": GEMV_CHECK, "decode": KERNEL_CHECK, "fused": FUSED_CHECK}  # in the order their tests run
TESTS = {  # the test that reads each check
    "gemv": "test_the_gemv_and_its_fused_activations_match_torch",  # test_gemv_triton.py (skipped on CUDA)
    "decode": "test_the_triton_decode_kernels_match_torch",  # test_paged_kv.py
    "fused": "test_the_fused_elementwise_kernels_match_torch",  # test_paged_kv.py
}


def _run(name: str, timeout_s: float, started: list[subprocess.Popen] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPTS[name]], env={**os.environ, "TRITON_INTERPRET": "1"},
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if started is not None:
        started.append(proc)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


class Background:
    """The wanted checks, one after another in a thread: one core, beside the engine tests' one."""

    def __init__(self, names: list[str]) -> None:
        self.results: dict[str, subprocess.CompletedProcess | BaseException] = {}
        self.done = {name: threading.Event() for name in names}
        self.procs: list[subprocess.Popen] = []
        self.stopped = False
        self.thread = threading.Thread(target=self._main, name="interpreted-checks", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        for name, done in self.done.items():
            if self.stopped:
                break
            try:
                self.results[name] = _run(name, 600, self.procs)
            except BaseException as e:  # noqa: BLE001 - handed to the test that reads it
                self.results[name] = e
            done.set()

    def stop(self) -> None:
        self.stopped = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        self.thread.join(30)


_BACKGROUND = pytest.StashKey[Background]()


def start_early(item: pytest.Item) -> None:
    """Before the session's first test under tests/engine/: starts the checks whose tests it will run."""
    config = item.config
    if _BACKGROUND in config.stash or ENGINE_TESTS not in Path(str(item.path)).parents:
        return
    wanted: list[str] = []
    if importlib.util.find_spec("triton") is not None:
        import torch

        selected = {i.name for i in item.session.items}
        wanted = [name for name, test in TESTS.items()
                  if test in selected and not (name == "gemv" and torch.cuda.is_available())]
    config.stash[_BACKGROUND] = Background(wanted)


def result(config: pytest.Config, name: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """The check's exit status and output, once it is done (run now if it was not started)."""
    background = config.stash.get(_BACKGROUND, None)
    if background is None or name not in background.done:
        return _run(name, timeout_s)
    if not background.done[name].wait(timeout_s):
        raise TimeoutError(f"the {name} check did not finish in {timeout_s} s")
    got = background.results[name]
    if isinstance(got, BaseException):
        raise got
    return got


def stop_all(config: pytest.Config) -> None:
    background = config.stash.get(_BACKGROUND, None)
    if background is not None:
        background.stop()
