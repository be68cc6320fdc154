"""The real 8-process mesh of test_traffic_vs_real.py, started in the background as the session begins.

`scripts/bench_discovery.py --rest-only` runs 8 `meshllm node join` processes in a network namespace of
their own and counts their traffic at rest for 30 s: about 45 s, nearly all of it waiting. Nothing of it
meets the other tests (its loopback is its own; at rest its nodes send a ~160 B beat every 2.5 s), so
it runs while they do: started before collection (its nodes' start-up overlaps the collection's
imports), its figures read by the test when its turn comes. The test runs it in the foreground when it
was not started here (the test not selected at first) or when that mesh did not form.

tests/conftest.py calls start_early, keep_if_selected and stop from pytest's hooks. A unique module
name: tests/ has no __init__.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_FILE = REPO / "tests" / "simulations" / "test_traffic_vs_real.py"
TEST_NAME = "test_homelab8_bytes_match_a_real_8_process_mesh"
ARGS = ("--rest-only", "--modes", "libp2p", "--sizes", "8", "--rest-s", "30", "--settle-s", "5")


def can_run() -> bool:
    """The bench needs its own network namespace: root and `ip netns`."""
    return os.geteuid() == 0 and shutil.which("ip") is not None


def _default_sigint() -> None:
    """In the child before exec: a shell's background job (`scripts/test.sh &`) ignores SIGINT, and the
    ignoring would pass on to the bench and its nodes; close() needs SIGINT to stop them cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class RestRun:
    """One bench_discovery.py run at rest; its process is the leader of its own process group."""

    proc: subprocess.Popen
    workdir: Path  # a temporary dir of its own, for the --json it writes

    @classmethod
    def start(cls) -> RestRun:
        workdir = Path(tempfile.mkdtemp(prefix="meshllm-rest-bench-"))
        proc = subprocess.Popen([sys.executable, "scripts/bench_discovery.py", *ARGS, "--json", str(workdir / "rest.json")],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, preexec_fn=_default_sigint)
        return cls(proc, workdir)

    def result(self, timeout_s: float = 300) -> tuple[dict, str]:
        """Waits for the run; its one "rest" row and its output (CalledProcessError if it failed)."""
        try:
            output, _ = self.proc.communicate(timeout=timeout_s)
            if self.proc.returncode != 0:
                raise subprocess.CalledProcessError(self.proc.returncode, self.proc.args, output)
            [real] = json.loads((self.workdir / "rest.json").read_text())["rest"]
            return real, output
        finally:
            self.close()

    def close(self) -> None:
        """Stops it if it still runs: SIGINT to the script's namespaced half and its nodes (they stop, it
        removes its files), then its outer half deletes the namespace and exits; SIGKILL to the whole
        group if that takes over 30 s. (SIGINT to the outer half too would kill the inner after 0.25 s.)"""
        if self.proc.poll() is None:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.send_signal(signal.SIGINT)
            try:
                self.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.communicate()
        shutil.rmtree(self.workdir, ignore_errors=True)


_RUN = pytest.StashKey[RestRun]()


def _start(config: pytest.Config) -> None:
    config.stash[_RUN] = RestRun.start()


def start_early(config: pytest.Config) -> None:
    """Before collection: starts the run when the invocation collects the test file and filters nothing
    by name or mark (keep_if_selected stops it if the test is deselected after all)."""
    opt = config.option
    if not can_run() or opt.collectonly or opt.keyword or opt.markexpr or getattr(opt, "deselect", None):
        return
    paths = [(config.invocation_params.dir / str(arg).split("::")[0]).resolve() for arg in config.args]
    if any(TEST_FILE == p or p in TEST_FILE.parents for p in paths):
        _start(config)


def keep_if_selected(config: pytest.Config, items: list[pytest.Item]) -> None:
    """After collection: starts the run if the test is selected and it was not started, stops it if not."""
    selected = can_run() and not config.option.collectonly and any(
        item.name == TEST_NAME and Path(str(item.path)) == TEST_FILE for item in items)
    run = config.stash.get(_RUN, None)
    if selected and run is None:
        _start(config)
    elif not selected and run is not None:
        stop(config)


def take(config: pytest.Config) -> RestRun | None:
    """The run started with the session, handed over once (None when there is none)."""
    run = config.stash.get(_RUN, None)
    if run is not None:
        del config.stash[_RUN]
    return run


def stop(config: pytest.Config) -> None:
    run = take(config)
    if run is not None:
        run.close()
