"""Progress of model and layer-range loads: a tqdm bar in a terminal, and a snapshot for /mesh/self.

The engines load in one blocking call with no progress hook, so progress is measured from outside:
the growth of this process's resident memory against the load's byte estimate (the same figure the
memory budget reserves), sampled every `POLL_S`, held below 99% until the load returns.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

import psutil

POLL_S = 0.2
KEEP_FINISHED = 8  # finished loads still shown (the dashboard sees what loaded recently)


@dataclass(slots=True)
class Load:
    what: str
    total_bytes: int
    started_s: float  # wall clock
    done_bytes: int = 0
    state: str = "loading"  # "loading" | "loaded" | "failed"
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "what": self.what, "state": self.state, "total_bytes": self.total_bytes, "done_bytes": self.done_bytes,
            "fraction": round(self.done_bytes / self.total_bytes, 3) if self.total_bytes else 0.0,
            "seconds": round(self.seconds if self.state != "loading" else time.time() - self.started_s, 1),
        }


class LoadProgress:
    def __init__(self, bars: bool | None = None) -> None:
        self._bars = sys.stdout.isatty() if bars is None else bars  # bars only where someone watches
        self._loads: list[Load] = []
        self._lock = threading.Lock()
        self._terminal: TextIO | None = None

    def snapshot(self) -> list[dict]:
        with self._lock:
            return [load.as_dict() for load in self._loads]

    @property
    def loading(self) -> bool:
        with self._lock:
            return any(load.state == "loading" for load in self._loads)

    @contextlib.contextmanager
    def track(self, what: str, total_bytes: int) -> Iterator[Load]:
        """Around one blocking load: samples progress on a thread until the body returns or raises."""
        load = Load(what, max(1, total_bytes), time.time())
        with self._lock:
            self._loads.append(load)
        proc = psutil.Process()
        rss0 = proc.memory_info().rss
        stop = threading.Event()
        bar = self._bar(what, load.total_bytes)

        def sample() -> None:
            while not stop.wait(POLL_S):
                grown = proc.memory_info().rss - rss0
                load.done_bytes = max(load.done_bytes, min(int(load.total_bytes * 0.99), max(0, grown)))
                if bar is not None:
                    bar.update(load.done_bytes - bar.n)

        sampler = threading.Thread(target=sample, name="load-progress", daemon=True)
        sampler.start()
        started = time.monotonic()
        try:
            yield load
            load.state, load.done_bytes = "loaded", load.total_bytes
        except BaseException:
            load.state = "failed"
            raise
        finally:
            stop.set()
            sampler.join()
            load.seconds = time.monotonic() - started
            if bar is not None:
                bar.update(load.done_bytes - bar.n)
                bar.set_postfix_str(load.state)
                bar.close()
            with self._lock:
                finished = [x for x in self._loads if x.state != "loading"]
                for old in finished[:-KEEP_FINISHED]:
                    self._loads.remove(old)

    def _bar(self, what: str, total_bytes: int):  # -> tqdm | None
        if not self._bars:
            return None
        from tqdm import tqdm

        if self._terminal is None:
            # our own handle on the terminal: llama.cpp points fd 1 at /dev/null while it loads
            self._terminal = open(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")  # noqa: SIM115
        width = shutil.get_terminal_size((100, 24)).columns  # a terminal of width 0 (a bare pty) gets 100
        return tqdm(total=total_bytes, desc=f"loading {what}", unit="B", unit_scale=True, unit_divisor=1024,
                    file=self._terminal, leave=True, ncols=width)
