"""The bytes each piece of a GGUF model takes once loaded, per weights form and device.

Read from the tensor table (names, types, shapes): nothing is dequantized. This is what the node's
memory budget, its adverts (`FileAdvert`) and the planners count.

| form | device | a 2-D weight | 1-D (norms) | embedding lookups |
|---|---|---|---|---|
| quantized | CPU | GGUF bytes as stored (ggml reads them) | fp32 | stored bytes |
| quantized | CUDA | Q4_0/Q4_1/Q4_K: int4 + bf16 scale/zero per 32; others bf16 | bf16 | stored bytes (host) |
| full | any | 4 (CPU) or 2 (CUDA) bytes per value | same | same as a weight |
"""

from __future__ import annotations

import re
from pathlib import Path

from shard.gguf_index import GGUFIndex, TensorInfo, open_index
from shard.gguf_tensor import INT4_GROUP, int4_ok
from shard.memory import WeightBytes

_BLOCK = re.compile(r"blk\.(\d+)\.")


def tensor_bytes(t: TensorInfo, form: str, device: str) -> int:
    """Bytes one tensor holds in `form` on `device` (as a layer weight, not as an embedding)."""
    n = t.n_elements
    cuda = device.startswith("cuda")
    if form == "full":
        return n * (2 if cuda else 4)
    if len(t.shape) < 2:  # norms and biases: dense
        return n * (2 if cuda else 4)
    if not cuda:
        return t.n_bytes
    cols, rows = t.shape[0], t.shape[1]  # gguf lists the fastest dimension first
    if int4_ok(t.type_name, rows, cols):
        # K padded to a multiple of 128 (engine/int4_triton.py's layout; tinygemm's holds exactly K):
        # the larger of the two CUDA int4 forms, so no --int4-kernel overruns the budget
        k = -(-cols // 128) * 128
        return rows * k // 2 + rows * (k // INT4_GROUP) * 2 * 2
    return n * 2


def weight_bytes(index: GGUFIndex, n_layers: int, form: str, device: str) -> WeightBytes:
    layers = [0] * n_layers
    by_name = index.tensors
    for t in by_name.values():
        m = _BLOCK.match(t.name)
        if m and int(m.group(1)) < n_layers:
            layers[int(m.group(1))] += tensor_bytes(t, form, device)
    embd = by_name["token_embd.weight"]
    cuda = device.startswith("cuda")
    # lookups read rows of the stored bytes (quantized), or of the dense matrix (full)
    embed = tensor_bytes(embd, "full", device) if form == "full" else embd.n_bytes
    head_t = by_name.get("output.weight", embd)
    head = tensor_bytes(by_name["output_norm.weight"], form, device)
    if form == "full" or head_t is not embd or cuda:
        head += tensor_bytes(head_t, form, device)
    else:
        head += embd.n_bytes
    # the same bytes serve lookups and the head: dense (full), or GGUF bytes read by ggml (CPU)
    shares = head_t is embd and (form == "full" or not cuda)
    return WeightBytes(layers=tuple(layers), embed=embed, head=head, head_shares_embed=shares)


def model_weight_bytes(path: str | Path, n_layers: int, form: str, device: str) -> WeightBytes:
    return weight_bytes(open_index(path), n_layers, form, device)
