from __future__ import annotations

import pytest

from engine.stop import StopMatcher


@pytest.mark.parametrize(
    ("stops", "pieces", "emitted", "hit"),
    [
        ((), ["a", "b"], "ab", False),
        (("END",), ["hello ", "E", "N", "D", " more"], "hello ", True),
        (("END",), ["hello E", "NX"], "hello ENX", False),  # a false start is released
        (("END",), ["xEN"], "x", False),  # held back: could still become END
        (("\n\n", "###"), ["a\n", "\nb"], "a", True),
        (("ab", "b"), ["xab"], "x", True),  # the earliest stop wins
    ],
)
def test_stop_matcher(stops, pieces, emitted, hit):
    m = StopMatcher(stops)
    out, got_hit = [], False
    for piece in pieces:
        text, got_hit = m.feed(piece)
        out.append(text)
        if got_hit:
            break
    assert "".join(out) == emitted and got_hit == hit


def test_flush_releases_held_text():
    m = StopMatcher(("END",))
    assert m.feed("abcE") == ("abc", False)
    assert m.flush() == "E"
