"""`meshllm chat` as a user runs it (a subprocess), against a real node: one-shot answers, a
conversation driven through stdin, errors as exit codes, API keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest
from conftest import REPO

MODEL = "smollm2-135m-instruct"
GREEDY = ("--temperature", "0", "--max-tokens", "12")


def chat(*args: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", "chat", *args], cwd=REPO, input=stdin, text=True,
                          capture_output=True, timeout=120, env={**os.environ, **(env or {})})


def api_answer(url: str, messages: list[dict]) -> str:
    body = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 12}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())["choices"][0]["message"]["content"]


def prompt_tokens(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "meshllm_prompt_tokens_total")


@pytest.fixture(scope="module")
def node(module_node_factory):
    # the torch engine: greedy answers are the same every time (llama.cpp's prefix cache shifts them)
    return module_node_factory("C", "--engine", "torch", "--threads", "1")


def test_one_shot_prints_the_streamed_answer(node):
    done = chat(MODEL, "Name a colour.", "--url", node.url, *GREEDY)
    assert done.returncode == 0, done.stderr
    expected = api_answer(node.url, [{"role": "user", "content": "Name a colour."}])
    assert expected and done.stdout == expected + "\n"


def test_one_shot_picks_the_first_model_when_none_is_named(node):
    done = chat("--url", node.url, *GREEDY, stdin="")
    # no prompt: a conversation on an empty stdin, which ends at once
    assert done.returncode == 0, done.stderr
    assert f"chatting with {MODEL}" in done.stderr


@pytest.mark.parametrize(("args", "message"), [
    ((MODEL + "-nope", "Hi"), "HTTP 404"),
    ((MODEL, "Hi", "--max-tokens", "0"), "HTTP 400"),
])
def test_errors_exit_non_zero_with_the_servers_message(node, args, message):
    done = chat(*args, "--url", node.url)
    assert done.returncode == 1
    assert message in done.stderr and done.stdout == ""


def test_an_unreachable_node_is_an_error(node):
    done = chat(MODEL, "Hi", "--url", "http://127.0.0.1:9")
    assert done.returncode == 1 and "cannot reach" in done.stderr
    assert chat("--url", "http://127.0.0.1:9").returncode == 2  # no model to pick: cannot start


def test_a_conversation_keeps_history_and_takes_commands(node):
    first, second = "My name is Ada.", "What is my name?"
    alone = prompt_tokens(node.url)
    assert chat(MODEL, second, "--url", node.url, *GREEDY).returncode == 0
    second_alone = prompt_tokens(node.url) - alone

    before = prompt_tokens(node.url)
    script = f"{first}\n/model no-such-model\n\n{second}\n/exit\nnever sent\n"
    done = chat(MODEL, "--url", node.url, *GREEDY, stdin=script)
    assert done.returncode == 0, done.stderr
    assert "no model 'no-such-model'" in done.stderr
    answers = done.stdout.splitlines()
    assert len(answers) >= 2 and answers[0] == api_answer(node.url, [{"role": "user", "content": first}])
    # the second turn carried the first turn and its answer: more prompt than the question alone
    both = prompt_tokens(node.url) - before
    first_alone = prompt_tokens(node.url)
    assert chat(MODEL, first, "--url", node.url, *GREEDY).returncode == 0
    first_alone = prompt_tokens(node.url) - first_alone
    assert both > first_alone + second_alone


def test_clear_forgets_the_conversation(node):
    before = prompt_tokens(node.url)
    done = chat(MODEL, "--url", node.url, *GREEDY, stdin="Hello there.\n/clear\nHello there.\n")
    assert done.returncode == 0, done.stderr
    used = prompt_tokens(node.url) - before
    lines = done.stdout.splitlines()
    assert lines[0] == lines[-1]  # the same question with no history: the same greedy answer
    assert used % 2 == 0  # two identical prompts


def test_the_api_key_is_sent(node_factory):
    keyed = node_factory("K", "--threads", "1", "--api-key", "sk-chat-key")
    refused = chat(MODEL, "Hi", "--url", keyed.url, "--max-tokens", "2")
    assert refused.returncode == 1 and "HTTP 401" in refused.stderr
    assert chat(MODEL, "Hi", "--url", keyed.url, "--max-tokens", "2", "--api-key", "sk-chat-key").returncode == 0
    by_env = chat(MODEL, "Hi", "--url", keyed.url, "--max-tokens", "2", env={"MESHLLM_API_KEY": "sk-chat-key"})
    assert by_env.returncode == 0, by_env.stderr
