"""Stop strings over streamed text: never emit a stop string, hold back what could start one."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class StopMatcher:
    stops: tuple[str, ...]
    _pending: str = field(default="", init=False)

    def feed(self, text: str) -> tuple[str, bool]:
        """Adds generated text; returns (text safe to emit now, whether a stop string was hit).

        On a hit the returned text ends just before the stop string and the rest is dropped.
        """
        if not self.stops:
            return text, False
        buf = self._pending + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return buf[:cut], True
        # Hold back the longest suffix of buf that is a proper prefix of some stop string.
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:n]):
                    hold = n
                    break
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """Text held back when generation ends for another reason (EOS or length)."""
        text, self._pending = self._pending, ""
        return text
