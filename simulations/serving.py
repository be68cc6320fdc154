"""Request service on the fake clock: a server with slots and a FIFO queue.

A whole-model holder and a pipeline are both such a server; they differ only in their per-request
time. Batched decode is bandwidth bound, so each extra stream in flight slows the others a little
(`BATCH_SLOWDOWN` per stream) rather than sharing the time evenly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from simulations.events import EventQueue

BATCH_SLOWDOWN = 0.08


@dataclass(slots=True)
class Request:
    rid: int
    arrived_s: float
    kind: str  # "whole" | "pipeline"
    gateway: object = None  # the SimNode that routes it (simulations/gateway.py)
    attempts: object = None  # dataplane.routing.retry.Attempts of the current try
    chain_tries: int = 0
    client_tries: int = 0
    waits: int = 0
    holder: str = ""
    chain: tuple[str, ...] = ()
    done: bool = False


class Server:
    __slots__ = ("events", "slots", "request_s", "running", "queue", "on_done", "on_fail", "on_change")

    def __init__(self, events: EventQueue, slots: int, request_s: float,
                 on_done: Callable[[Request], None], on_fail: Callable[[Request], None]) -> None:
        self.events = events
        self.slots = slots
        self.request_s = request_s
        self.running: dict[int, Request] = {}
        self.queue: list[Request] = []
        self.on_done = on_done
        self.on_fail = on_fail
        self.on_change: Callable[[], None] | None = None  # load changed: the node re-publishes

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    @property
    def load(self) -> int:
        return len(self.running) + len(self.queue)

    def submit(self, req: Request) -> None:
        if len(self.running) < self.slots:
            self._start(req)
        else:
            self.queue.append(req)
        self._changed()

    def _start(self, req: Request) -> None:
        self.running[req.rid] = req
        duration = self.request_s * (1 + BATCH_SLOWDOWN * (len(self.running) - 1))
        self.events.after(duration, self._finish, req.rid)

    def _finish(self, rid: int) -> None:
        req = self.running.pop(rid, None)
        if req is None:  # failed meanwhile
            return
        self.on_done(req)
        if self.queue:
            self._start(self.queue.pop(0))
        self._changed()

    def fail_all(self) -> None:
        """The node (or a stage) crashed: every request on it fails back to its gateway."""
        victims = list(self.running.values()) + self.queue
        self.running.clear()
        self.queue.clear()
        for req in victims:
            self.on_fail(req)
