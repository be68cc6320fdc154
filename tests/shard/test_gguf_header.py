"""shard/gguf_header.py: the same header as gguf-py reads (every value type, a real vocabulary), and
hostile headers (truncated, over caps, inconsistent, fuzzed) refused with one GGUFHeaderError."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.model_file import resolve_path
from shard.config import ModelConfigError
from shard.gguf_header import MAX_ARRAY, MAX_KV, GGUFHeaderError, StringArray, read_header
from shard.gguf_index import open_index

T = gguf.GGUFValueType


def _as_gguf_py(path: Path) -> tuple[dict, dict, dict, int]:
    """What gguf.GGUFReader makes of the file, in this reader's terms: the oracle."""
    r = gguf.GGUFReader(path)
    keys = [k for k in r.fields if not k.startswith("GGUF.")]
    fields = {k: r.fields[k].contents() for k in keys}
    types = {k: tuple(r.fields[k].types) for k in keys}
    tensors = {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape), int(t.n_elements), int(t.n_bytes),
                        int(t.data_offset)) for t in r.tensors}
    return fields, types, tensors, r.data_offset


def _assert_same_as_gguf_py(path: Path) -> None:
    fields, types, tensors, data_offset = _as_gguf_py(path)
    h = read_header(path)
    assert list(h.fields) == list(fields) and h.types == types
    for key, value in h.fields.items():
        mine = value.tolist() if isinstance(value, np.ndarray) else list(value) if isinstance(value, StringArray) else value
        assert mine == fields[key] and type(mine) is type(fields[key]), key
    assert {t.name: (t.type_name, t.shape, t.n_elements, t.n_bytes, t.offset) for t in h.tensors.values()} == tensors
    assert list(h.tensors) == list(tensors) and h.data_offset == data_offset


def _write_every_type(path: Path, alignment: int | None = None) -> Path:
    w = gguf.GGUFWriter(path, "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    scalars = {T.UINT8: 200, T.INT8: -100, T.UINT16: 60000, T.INT16: -30000, T.UINT32: 4_000_000_000,
               T.INT32: -2_000_000_000, T.FLOAT32: 0.5, T.BOOL: True, T.UINT64: 1 << 60, T.INT64: -(1 << 60),
               T.FLOAT64: 1e300}
    for vtype, value in scalars.items():
        w.add_key_value(f"test.{vtype.name.lower()}", value, vtype)
        w.add_key_value(f"test.{vtype.name.lower()}s", [value, value], T.ARRAY, sub_type=vtype)
    w.add_key_value("test.string", "héllo {{ template }}", T.STRING)
    w.add_key_value("test.strings", ["a", "", "日本語", "\x00x"], T.ARRAY, sub_type=T.STRING)
    w.add_tensor("scalar_like", np.arange(3, dtype=np.float32))
    w.add_tensor("matrix", np.ones((4, 32), dtype=np.float16))
    w.add_tensor("q", np.zeros((2, 18), dtype=np.uint8), raw_shape=(2, 18), raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64, 1])
def test_every_value_type_reads_as_gguf_py_reads_it(tmp_path, alignment):
    _assert_same_as_gguf_py(_write_every_type(tmp_path / "t.gguf", alignment))


def test_a_real_vocabulary_reads_as_gguf_py_reads_it():
    path = resolve_path("smollm2-135m-instruct")[0]
    _assert_same_as_gguf_py(path)
    tokens = read_header(path).fields["tokenizer.ggml.tokens"]
    assert isinstance(tokens, StringArray) and len(tokens) == 49152
    assert tokens[0] == "<|endoftext|>" and tokens[-1] == list(tokens)[-1] and tokens[1:3] == list(tokens)[1:3]


# --- hostile headers, written byte by byte ---

def _s(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def _kv(key: bytes, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _tensor(name: bytes = b"t", dims: tuple[int, ...] = (32,), qtype: int = 0, offset: int = 0) -> bytes:
    return _s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", qtype, offset)


def _tables(kvs: list[bytes], tensors: list[bytes] | None = None, *, n_kv: int | None = None,
            n_tensors: int | None = None, version: int = 3, magic: bytes = b"GGUF") -> bytes:
    """The header alone: nothing after the tensor table."""
    tensors = [_tensor()] if tensors is None else tensors
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    return head + b"".join(kvs) + b"".join(tensors)


def _file(kvs: list[bytes], tensors: list[bytes] | None = None, **header: int | bytes) -> bytes:
    body = _tables(kvs, tensors, **header)
    return body + b"\0" * (-len(body) % 32) + b"\0" * 128  # aligned, then the tensor's bytes


ARCH = _kv(b"general.architecture", T.STRING, _s(b"llama"))


def _read(tmp_path: Path, data: bytes):
    path = tmp_path / "h.gguf"
    path.write_bytes(data)
    return read_header(path)


def test_the_hand_written_file_is_well_formed(tmp_path):
    h = _read(tmp_path, _file([ARCH]))
    assert h.fields == {"general.architecture": "llama"} and h.tensors["t"].n_bytes == 128


@pytest.mark.parametrize(("data", "why"), [
    (b"GGUF" + b"\0" * 10, "too short"),
    (_file([ARCH], magic=b"GGUX"), "bad magic"),
    (_file([ARCH], version=1), "version 1"),
    (_file([ARCH], version=3 << 24), "version 50331648"),  # a big-endian file
    (_file([ARCH], n_kv=MAX_KV + 1), "over the caps"),
    (_file([ARCH], n_kv=1 << 62), "over the caps"),
    (_file([ARCH], n_tensors=1 << 40), "over the caps"),
    (_tables([ARCH], n_kv=2), "runs past the end"),  # says more keys than there are
    (_tables([ARCH], n_tensors=5), "runs past the end"),
    (_file([ARCH, ARCH]), "duplicate key"),
    (_file([ARCH], [_tensor(), _tensor()]), "duplicate tensor"),
    (_file([_kv(b"k", 13, b"")]), "unknown value type 13"),
    (_file([_kv(b"k", T.STRING, struct.pack("<Q", 1 << 63))]), "over the 224-byte cap"),
    (_file([_kv(b"k" * 70000, T.UINT8, b"\1")]), "cap"),
    (_file([_kv(b"\xff\xfe", T.UINT8, b"\1")]), "malformed"),  # a key that is not UTF-8
    (_file([_kv(b"k", T.ARRAY, struct.pack("<IQ", T.UINT32, MAX_ARRAY + 1))]), "over the"),
    (_file([_kv(b"k", T.ARRAY, struct.pack("<IQ", T.UINT64, 1 << 20))]), "runs past the end"),
    (_file([_kv(b"k", T.ARRAY, struct.pack("<IQ", T.STRING, 1 << 20))]), "runs past the end"),
    (_file([_kv(b"k", T.ARRAY, struct.pack("<IQ", T.STRING, 1) + struct.pack("<Q", 1 << 40))]), "runs past the end"),
    (_file([_kv(b"k", T.ARRAY, struct.pack("<IQ", T.ARRAY, 1) + struct.pack("<IQ", T.UINT8, 1) + b"\1")]), "nested"),
    (_file([ARCH, _kv(b"general.alignment", T.UINT32, struct.pack("<I", 0))]), "not a power of two"),
    (_file([ARCH, _kv(b"general.alignment", T.UINT32, struct.pack("<I", 48))]), "not a power of two"),
    (_file([ARCH, _kv(b"general.alignment", T.UINT64, struct.pack("<Q", 32))]), "not a UINT32"),
    (_file([ARCH], [_tensor(b"n" * 257)]), "cap"),
    (_file([ARCH], [_tensor(dims=(1, 1, 1, 1, 32))]), "5 dimensions"),
    (_file([ARCH], [_tensor(dims=(1 << 63,))]), "over 2\\^62"),
    (_file([ARCH], [_tensor(dims=(1 << 40, 1 << 40))]), "impossibly large"),
    (_file([ARCH], [_tensor(offset=1 << 63)]), "impossibly large or far"),
    (_file([ARCH], [_tensor(qtype=99)]), "unknown type 99"),
])  # fmt: skip
def test_a_malformed_header_is_refused_with_one_error(tmp_path, data, why):
    with pytest.raises(GGUFHeaderError, match=why):
        _read(tmp_path, data)


def test_a_header_cut_anywhere_is_refused(tmp_path):
    tables = _tables([ARCH, _kv(b"v", T.ARRAY, struct.pack("<IQ", T.STRING, 2) + _s(b"ab") + _s(b"c"))])
    assert list(_read(tmp_path, tables).fields["v"]) == ["ab", "c"]
    for n in range(len(tables)):
        with pytest.raises(GGUFHeaderError):
            _read(tmp_path, tables[:n])


def test_the_index_refuses_a_tensor_past_the_end_of_the_file(tmp_path):
    path = tmp_path / "short.gguf"
    path.write_bytes(_file([ARCH])[:-1])
    with pytest.raises(ModelConfigError, match="runs past the end of the file"):
        open_index(path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=6))
def test_a_fuzzed_header_parses_or_is_refused_with_one_error(tmp_path, flips):
    data = bytearray(_file([ARCH, _kv(b"v", T.ARRAY, struct.pack("<IQ", T.STRING, 2) + _s(b"ab") + _s(b"c")),
                            _kv(b"n", T.ARRAY, struct.pack("<IQ", T.INT32, 2) + b"\1\0\0\0\2\0\0\0")]))
    for at, byte in flips:
        data[at % len(data)] = byte
    try:
        _read(tmp_path, bytes(data))
    except GGUFHeaderError:
        pass  # anything else (IndexError, OverflowError, MemoryError, a hang) fails the test
