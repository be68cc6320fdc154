"""Quantized linear layers against dequantize-then-matmul, for every GGUF type the engine runs.

Tensors are quantized with gguf's numpy quantizer where it has one (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
F16, BF16) and with ggml's (the one llama.cpp's tools use) for the K-quants; the reference
dequantizes with gguf's independent numpy code. ggml quantizes the activations to 8 bits for
quantized weights (as llama.cpp does), so the tolerance is that of an int8 activation.
"""

import gguf
import numpy as np
import pytest
import torch

from engine import ggml_cpu
from engine.ggml_cpu import GgmlCpu
from engine.linear import DenseLinear, GgmlLinear, LinearFactory
from shard.gguf_tensor import (
    INT4_TYPES,
    RawTensor,
    TensorTypeError,
    int4_dequantize,
    to_int4_groups,
)

GGUF_QUANTIZES = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16", "F32"}
ALL_TYPES = sorted(GGUF_QUANTIZES | {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"})
# relative Frobenius error of y = x @ W.T against the fp32 reference (measured: see docs/torch-engine.md)
TOLERANCE = {"F32": 1e-6, "F16": 2e-3, "BF16": 1e-2}
QUANT_TOLERANCE = 1e-2  # 8-bit activations


def make_raw(type_name: str, rows: int, cols: int, seed: int = 0) -> RawTensor:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name in GGUF_QUANTIZES:
        data = gguf.quants.quantize(w, qtype).view(np.uint8).reshape(rows, -1)
    else:
        data = ggml_cpu.quantize(type_name, w)
    return RawTensor(f"test.{type_name}", type_name, rows, cols, np.ascontiguousarray(data))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def ggml():
    g = GgmlCpu(n_threads=1)
    yield g
    g.close()


@pytest.mark.parametrize("type_name", ALL_TYPES)
@pytest.mark.parametrize("m", [1, 5, 33])
def test_ggml_matmul_matches_dequantized(ggml, type_name, m):
    raw = make_raw(type_name, 96, 512)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(1))
    ref = x @ torch.from_numpy(raw.dequantize()).T
    (y,) = GgmlLinear(ggml, [raw], None)(x)
    assert y.shape == (m, 96)
    assert rel_err(y, ref) < TOLERANCE.get(type_name, QUANT_TOLERANCE)


def test_ggml_group_runs_parts_of_different_types_with_bias(ggml):
    parts = [make_raw("Q4_K", 64, 256, 1), make_raw("Q4_K", 32, 256, 2), make_raw("Q6_K", 32, 256, 3)]
    bias = torch.randn(128)
    x = torch.randn(2, 3, 256)  # leading dims are kept
    outs = GgmlLinear(ggml, parts, bias)(x)
    assert [tuple(o.shape) for o in outs] == [(2, 3, 64), (2, 3, 32), (2, 3, 32)]
    w = torch.from_numpy(np.concatenate([p.dequantize() for p in parts]))
    ref = (x @ w.T + bias).split([64, 32, 32], dim=-1)
    for o, r in zip(outs, ref, strict=True):
        assert rel_err(o, r) < QUANT_TOLERANCE


def test_ggml_get_rows_is_exact(ggml):
    raw = make_raw("Q6_K", 50, 256)
    handle = ggml.register(ggml_cpu.GgmlWeight("Q6_K", 50, 256, raw.data.reshape(-1)))
    ids = torch.tensor([3, 0, 49, 3])
    rows = ggml.get_rows(handle, ids, 256)
    assert torch.equal(rows, torch.from_numpy(raw.dequantize())[ids])


@pytest.mark.parametrize("type_name", sorted(INT4_TYPES))
def test_int4_groups_are_exact(type_name):
    """Q4_0 / Q4_1 / Q4_K re-expressed as (q - 8) * scale + zero lose nothing before 16-bit rounding."""
    raw = make_raw(type_name, 16, 512)
    g = to_int4_groups(raw)
    assert g.q.max() <= 15 and g.scales.shape == (16, 16)
    np.testing.assert_allclose(int4_dequantize(g), raw.dequantize(), rtol=0, atol=1e-6)


def test_int4_groups_match_torch_tinygemm_convention_on_cpu():
    """The CPU twin of tinygemm reads (q - 8) * scale + zero in the same [K/32, N, 2] layout."""
    raw = make_raw("Q4_K", 64, 256)
    g = to_int4_groups(raw)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(g.q.astype(np.int32)), 1)
    sz = torch.from_numpy(np.stack([g.scales, g.zeros], -1)).transpose(0, 1).contiguous()
    x = torch.randn(3, 256)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
    ref = x @ torch.from_numpy(raw.dequantize()).T
    assert rel_err(y, ref) < 1e-5


def test_unsupported_or_truncated_tensors_are_named():
    raw = make_raw("Q4_0", 8, 64)
    with pytest.raises(TensorTypeError, match="not a 4-bit"):
        to_int4_groups(make_raw("Q8_0", 8, 64))
    with pytest.raises(ValueError, match="needs"):
        ggml_cpu.GgmlWeight("Q4_0", 8, 64, raw.data.reshape(-1)[:-1].copy())


def test_full_form_is_dense_and_rows_are_a_byte_operation(ggml):
    raw = make_raw("Q4_1", 32, 128)
    order = np.array([5, 0, 31, 5])
    np.testing.assert_array_equal(raw.take_rows(order).dequantize(), raw.dequantize()[order])
    full = LinearFactory("full", torch.device("cpu"), torch.float32, None)([raw])
    assert isinstance(full, DenseLinear) and full.weight.dtype == torch.float32
    quant = LinearFactory("quantized", torch.device("cpu"), torch.float32, ggml)([raw])
    assert quant.nbytes == raw.nbytes < full.nbytes / 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("type_name", ALL_TYPES)
@pytest.mark.parametrize("m", [1, 8, 32])
def test_cuda_quantized_matches_dequantized(type_name, m):
    raw = make_raw(type_name, 256, 1024)
    dev = torch.device("cuda")
    lin = LinearFactory("quantized", dev, torch.bfloat16, None)([raw])
    x = torch.randn(m, 1024, device=dev)
    ref = x @ torch.from_numpy(raw.dequantize()).to(dev).T
    (y,) = lin(x.to(torch.bfloat16))
    assert rel_err(y.float(), ref) < 2e-2  # bf16 activations and 16-bit scales


@pytest.mark.parametrize("type_name", ["Q4_0", "Q8_0", "F16", "Q4_K"])
def test_rows_give_the_same_bits_whatever_else_is_in_the_batch(ggml, type_name):
    """ggml picks kernels by row count (tinyBLAS for M >= 2 on some types); small batches are
    multiplied row by row so a row's result does not depend on its neighbours."""
    lin = GgmlLinear(ggml, [make_raw(type_name, 64, 256)], None)
    x = torch.randn(6, 256)
    (together,) = lin(x)
    for i in range(6):
        assert torch.equal(lin(x[i : i + 1])[0][0], together[i])
