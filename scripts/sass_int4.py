"""The int4 Triton kernels' machine code for Hopper, compiled here, without a GPU (issue 12).

    python scripts/sass_int4.py row '{"BLOCK_N": 64, "SPLIT_K": 8, "MAGIC": 4, "FIXUP": true, "PDL": true}' 4 3
    python scripts/sass_int4.py swap '{"BLOCK_M": 64, "BLOCK_N": 64, "SPLIT_K": 2, "MAGIC": 3, "FIXUP": false, "PDL": true}' 4 2
    python scripts/sass_int4.py gluon '{"BLOCK_M": 64, "BLOCK_N": 128, "NUM_WARPS": 8, "DEPTH": 4, "INFLIGHT": 2, "PDL": true}' 8 1
    python scripts/sass_int4.py gluon_ws '{"BLOCK_M": 128, "BLOCK_N": 256, "NUM_WARPS": 8, "DEPTH": 3, "INFLIGHT": 2, "PDL": true}' 8 1

Arguments: kernel (row, dot, swap of engine/int4_triton.py; gluon, gluon_ws: engine/int4_gluon.py's
plain and warp-specialized kernels, whose depth is their DEPTH, not num_stages), its constexprs as JSON, num_warps, num_stages. Triton compiles for
sm_90 on the CPU (ptxas and nvdisasm ship in its wheel); integer arguments and pointers are declared
divisible by 16, as the JIT specializes them at run time for Llama-3-8B's shapes. Prints the
instruction mix of the whole kernel and of its main loop (the instructions between a backward
branch and its target). Run it with the device's Triton (`pip install --target DIR triton==3.6.0`,
then `PYTHONPATH=DIR`) to see the code the H200 runs. The figures in docs/benchmarks.md ("Why int4
still misses") come from here.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine.int4_triton as k4  # noqa: E402

_COMMON = {"X": "*bf16", "QW": "*i32", "S": "*bf16", "Z": "*bf16", "Y": "*fp32", "YF": "*bf16", "CNT": "*i32"}
SIGNATURES = {
    "row": {**_COMMON, "N": "i32", "K": "i32", "sys": "i32", "chunks_per_split": "i32"},
    "dot": {**_COMMON, "M": "i32", "N": "i32", "K": "i32", "sxm": "i32", "sym": "i32", "sys": "i32",
            "chunks_per_split": "i32"},
}
SIGNATURES["swap"] = SIGNATURES["dot"]
SIGNATURES["gluon"] = {k: v for k, v in SIGNATURES["dot"].items() if k not in ("YF", "CNT")}
SIGNATURES["gluon_ws"] = {**SIGNATURES["gluon"], "Y": "*bf16"}
KERNELS = {"row": k4._w4_row_kernel, "dot": k4._w4_dot_kernel, "swap": k4._w4_swap_kernel}
_INSTR = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def sass(kind: str, consts: dict[str, object], warps: int, stages: int) -> str:
    sig: dict[str, str] = dict(SIGNATURES[kind])
    sig.update({name: "constexpr" for name in consts})
    divisible = [i for i, (name, t) in enumerate(sig.items()) if t.startswith("*") or name in ("M", "N", "K", "sxm", "sym")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible}
    if kind.startswith("gluon"):  # imported here: the Triton kernels compile with a Triton that has no Gluon
        from triton.experimental.gluon._runtime import GluonASTSource

        from engine import int4_gluon

        fn = int4_gluon._w4_wgmma_kernel
        if kind == "gluon_ws":  # TMA descriptors: block shape and shared layout are part of the type
            fn, bm, bn, lay = int4_gluon._w4_ws_kernel, consts["BLOCK_M"], consts["BLOCK_N"], int4_gluon.WS_LAYOUTS
            descs = {"x_desc": f"tensordesc<bf16[{bm}, 128],{lay['x']!r}>", "q_desc": f"tensordesc<i32[{bn}, 16],{lay['q']!r}>",
                     "s_desc": f"tensordesc<bf16[{bn}],{lay['g']!r}>", "z_desc": f"tensordesc<bf16[{bn}],{lay['g']!r}>"}
            sig = {**descs, **{k: v for k, v in sig.items() if k not in ("X", "QW", "S", "Z", "sxm")}}
            attrs = {}
        src: ASTSource = GluonASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    else:
        src = ASTSource(fn=KERNELS[kind], signature=sig, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        Path(path).write_bytes(compiled.asm["cubin"])
        bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        usage = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
        code = subprocess.run([os.path.join(bin_dir, "nvdisasm"), "-c", path], capture_output=True, text=True, check=True)
        # registers and spill stack decide how many programs an SM keeps resident (latency hiding)
        found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
        head = f"registers {found.group(1)}, stack {found.group(2)} B, shared {found.group(3)} B\n" if found else ""
        return head + code.stdout


def mix(lines: list[str]) -> collections.Counter[str]:
    return collections.Counter(m.group(2) for line in lines if (m := _INSTR.match(line)))


def main() -> None:
    kind, consts, warps, stages = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    lines = sass(kind, consts, warps, stages).splitlines()
    whole = mix(lines)
    print(f"{kind} {consts} warps={warps} stages={stages}: {sum(whole.values())} instructions; {lines[0]}")
    print("  " + ", ".join(f"{op} {n}" for op, n in whole.most_common(24)))
    for i, line in enumerate(lines):
        target = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line)
        if not target:
            continue
        start = next((j for j, text in enumerate(lines) if text.strip().startswith(target.group(1) + ":")), None)
        if start is not None and start < i:
            body = mix(lines[start : i + 1])
            if sum(body.values()) > 8:
                print(f"  main loop {target.group(1)}: {sum(body.values())} instructions: "
                      + ", ".join(f"{op} {n}" for op, n in body.most_common(16)))


if __name__ == "__main__":
    main()
