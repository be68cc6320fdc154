from __future__ import annotations

import pytest

from engine import model_file
from engine.model_file import DEFAULT_ALIAS, ModelFileError, load_model_file


def test_default_alias_resolves_to_the_packaged_gguf(tmp_path):
    m = load_model_file(DEFAULT_ALIAS, tmp_path)
    assert m.alias == DEFAULT_ALIAS and m.architecture == "llama"
    assert (m.n_layers, m.hidden_size, m.context_length) == (30, 576, 8192)
    assert len(m.digest) == 64 and m.size_bytes > 50_000_000 and "im_start" in (m.chat_template or "")


def test_restart_reads_the_cached_digest_without_hashing(tmp_path, monkeypatch):
    first = load_model_file(DEFAULT_ALIAS, tmp_path)

    def no_hashing(path):
        raise AssertionError("re-hashed a cached model")

    monkeypatch.setattr(model_file, "sha256_file", no_hashing)
    assert load_model_file(DEFAULT_ALIAS, tmp_path) == first


def test_changed_file_is_rehashed(tmp_path):
    src = load_model_file(DEFAULT_ALIAS)
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(open(src.path, "rb").read())
    a = load_model_file(str(copy), tmp_path / "d")
    assert a.digest == src.digest and a.alias == DEFAULT_ALIAS  # one name per model (issue 13)
    with copy.open("ab") as f:
        f.write(b"\0" * 32)
    b = load_model_file(str(copy), tmp_path / "d")
    assert b.digest != src.digest and b.alias == "copy"


@pytest.mark.parametrize("content", [b"", b"GGML" + b"\0" * 100, b"GGUF\x03\0\0\0" + b"\xff" * 40])
def test_bad_files_raise_model_file_error(tmp_path, content):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelFileError):
        load_model_file(str(path), tmp_path)
