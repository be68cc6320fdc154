"""The int4 Triton kernels under Nsight Compute (the figures in docs/benchmarks.md, issue 12).

    ncu --clock-control none --kernel-name regex:"_w4_(row|swap)" --launch-skip 2 --launch-count 4 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis \\
        python scripts/profile_int4.py

Runs the launch shapes `launch_for` picks for one row and for 16 rows of Llama-3-8B's gate/up and o
matrices, three times each (ncu skips the first two launches: compilation and warm-up).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.int4_triton import launch_for, pack_int4, w4_matmul  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    for n, k in [(28672, 4096), (4096, 4096)]:
        q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.uint8)
        s = torch.full((n, k // 32), 0.003, device="cuda", dtype=torch.bfloat16)
        w = pack_int4(q, s, torch.zeros_like(s))
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cfg = launch_for(m, n, k)
            for _ in range(3):
                w4_matmul(x, w, cfg)
            torch.cuda.synchronize()
            print(n, k, m, cfg, flush=True)


if __name__ == "__main__":
    main()
