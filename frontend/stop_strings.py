"""Stop strings, checked on the text a frontend detokenizes as it streams.

NOTE: a stop string can span tokens (and so messages), and the client must never see part of
one. The matcher holds back the longest end of the text that is the start of some stop string
(at most ``len(longest stop) - 1`` characters), since the next tokens may complete it;
everything before it is safe to send, and text that cannot start a stop string goes out at
once. A match not yet complete starts inside that held end, so searching the held part plus the
new text finds every match, the earliest first. The output is cut before the stop string
(OpenAI's rule), and the text streamed out concatenates to the text a whole answer would have
had, however the tokens were split into messages.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feed it text deltas; it says what may go out and whether a stop string was reached."""

    def __init__(self, stops: Sequence[str]):
        if any(not s for s in stops):
            raise ValueError("a stop string must not be empty")
        self.stops = tuple(stops)
        self._longest = max((len(s) for s in self.stops), default=1)
        self._held = ""
        self.stopped = False
        """A stop string was reached: nothing more goes out."""

    def push(self, text: str) -> str:
        """The text that may go out now, given ``text`` after what came before; after a stop, ""."""
        if self.stopped:
            return ""
        buffer = self._held + text
        cut = self._first_match(buffer)
        if cut is not None:
            self.stopped, self._held = True, ""
            return buffer[:cut]
        keep = self._started(buffer)
        self._held = buffer[len(buffer) - keep:]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """At the end of the text: what is still held back (it held no stop string)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _started(self, text: str) -> int:
        """Length of the longest end of ``text`` that a stop string starts with (0: none)."""
        for k in range(min(self._longest - 1, len(text)), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stops):
                return k
        return 0

    def _first_match(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None
