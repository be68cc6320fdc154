"""Programmatic dependent launch (PDL) for the Triton kernels of a decode step.

A graphed batch-1 decode step of an 8B model runs about 290 kernels of 5-40 us each, and between two
of them the GPU drains the first grid, then launches the second: a gap of a microsecond or two per
kernel, several percent of the step. With PDL (Hopper and later) the next kernel's programs are
launched while the previous kernel's last wave still runs; each of our kernels then waits at its top
(`griddepcontrol.wait`, which returns once the previous grid has finished and its writes are
visible) before it reads anything, and at once lets its own successor launch. Only the launch
latency overlaps, so results are bit-for-bit those of plain launches.

Every kernel that takes a `PDL` flag must start with `pdl_prologue(PDL)`: a kernel launched with
`launch_pdl=True` that reads before waiting would race its predecessor. The one exception is the
batch-1 GEMV (engine/gemv_triton.py), which loads its first weight tile before waiting: weights are
never written by a kernel. tests/engine/test_pdl.py checks both rules on every kernel's source.
`MESHLLM_PDL=0` turns it off (benchmarks measure both in one run).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def _supported(index: int) -> bool:
    """sm_90+ and a Triton that knows the launch option (3.4 and later)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    known = "launch_pdl" in CUDAOptions.__dataclass_fields__ and hasattr(tl.extra.cuda, "gdc_wait")
    return known and torch.cuda.get_device_capability(index) >= (9, 0)


def enabled(device: torch.device) -> bool:
    """Whether kernels launched for `device` should use PDL (read at each launch: graphs capture it)."""
    if device.type != "cuda" or os.environ.get("MESHLLM_PDL", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(device: torch.device) -> dict[str, bool]:
    """The keyword arguments a launch adds: the kernel's `PDL` flag and Triton's `launch_pdl`."""
    on = enabled(device)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    """Wait for the previous kernel, then let the next one launch (no-ops when PDL is off)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

