"""A node that cannot load its model fails with one line on stderr, not a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, free_port


def run_join(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "node", "join", "--http-port", str(free_port()),
         "--data-dir", str(tmp_path / "data"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize(
    ("make_file", "expected"),
    [
        (None, "no such model file or alias"),
        (lambda p: p.write_bytes(b"this is not a gguf at all" * 100), "not a GGUF"),
        (lambda p: p.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64), "GGUF"),
    ],
    ids=["missing", "not-gguf", "truncated-gguf"],
)
def test_bad_model_file_fails_with_one_line(tmp_path, make_file, expected):
    path = tmp_path / "model.gguf"
    if make_file is not None:
        make_file(path)
    result = run_join(tmp_path, "--model", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("meshllm: error:") and expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_unknown_alias_lists_the_known_ones(tmp_path):
    result = run_join(tmp_path, "--model", "gpt-17")
    assert result.returncode == 2 and "smollm2-135m-instruct" in result.stderr


def test_port_in_use_is_one_line(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "node.cli", "node", "join", "--no-model", "--http-port", str(port),
             "--data-dir", str(tmp_path)],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
