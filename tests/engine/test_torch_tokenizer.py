"""The GGUF tokenizer through llama.cpp: ids, special tokens, streaming of split UTF-8."""

import pytest

from engine.model_file import load_model_file
from engine.tokenizer import GGUFTokenizer


@pytest.fixture(scope="module")
def tok():
    t = GGUFTokenizer(load_model_file("smollm2-135m-instruct").path)
    yield t
    t.close()


def test_special_tokens(tok) -> None:
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    assert tok.eos_text == "<|im_end|>" and tok.eos_id in tok.eog_ids
    assert tok.encode("<|im_start|>user")[0] == tok.bos_id  # special tokens are parsed


def test_roundtrip_and_control_tokens_have_no_text(tok) -> None:
    text = "Hello, world! Ünïcödé 世界 🙂"
    ids = tok.encode(text + "<|im_end|>")
    assert ids[-1] == tok.eos_id and tok.decode(ids) == text


def test_stream_joins_multibyte_characters_split_across_tokens(tok) -> None:
    text = "世界 🙂 emoji"
    ids = tok.encode(text)
    pieces = [tok.token_bytes(i) for i in ids]
    assert any(_incomplete(p) for p in pieces)  # the case under test happens
    stream = tok.stream()
    out = [stream.feed(i) for i in ids]
    assert "".join(out) + stream.flush() == text
    assert all("\ufffd" not in p for p in out)


def _incomplete(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True
