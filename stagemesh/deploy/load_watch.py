"""What `stagemesh up` shows while the mesh loads: each worker's weight-loading progress, read
from the lines its log gets (``stagemesh.runtime.load_progress``).

On a terminal, one progress bar per worker; otherwise (a pipe, a file, CI) one line per worker
when it starts loading, at most every ``LINE_EVERY_S`` while it loads, and when it has loaded.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

from stagemesh.runtime.load_progress import LoadProgress, latest

LINE_EVERY_S = 5.0
"""Without a terminal: the least time between two lines of one worker (its last line always comes)."""


class LoadWatch:
    """Follows some log files from given offsets; ``poll()`` shows the progress they report."""

    def __init__(self, logs: dict[str, tuple[Path, int]], out: TextIO | None = None, tty: bool | None = None):
        """``logs``: name -> (its log file, the offset where this run's output starts)."""
        self.out = out or sys.stderr
        self.tty = self.out.isatty() if tty is None else tty
        self._logs = {name: path for name, (path, _) in logs.items()}
        self._offsets = {name: offset for name, (_, offset) in logs.items()}
        self.shown: dict[str, LoadProgress] = {}
        """Each worker's progress as last shown."""
        self._line_at: dict[str, float] = {}
        self._bars: dict = {}

    def __enter__(self) -> LoadWatch:  # noqa: PYI034 - typing.Self needs 3.11; the project runs on 3.10
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def poll(self) -> None:
        """Read what each log got since the last poll; show the workers whose progress moved."""
        for name in self._logs:
            progress = latest(self._read(name))
            if progress is not None and progress != self.shown.get(name):
                self._show(name, progress)
                self.shown[name] = progress

    def close(self) -> None:
        """Close the bars (a last poll first, so that they end where the logs are)."""
        self.poll()
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

    def _read(self, name: str) -> str:
        try:
            with open(self._logs[name], "rb") as f:
                f.seek(self._offsets[name])
                data = f.read()
        except OSError:
            return ""
        # NOTE: only whole lines: the rest is read again once the worker has finished writing it
        whole = data[: data.rfind(b"\n") + 1]
        self._offsets[name] += len(whole)
        return whole.decode(errors="replace")

    def _show(self, name: str, progress: LoadProgress) -> None:
        if self.tty:
            self._bar(name, progress)
            return
        now = time.monotonic()
        finished = progress.done >= progress.total
        if finished or now - self._line_at.get(name, -LINE_EVERY_S) >= LINE_EVERY_S:
            verb = "loaded" if finished else "loading"
            print(f"{name}: {verb} {progress.done}/{progress.total} {progress.unit}", file=self.out, flush=True)
            self._line_at[name] = now

    def _bar(self, name: str, progress: LoadProgress) -> None:
        from tqdm import tqdm

        bar = self._bars.get(name)
        if bar is None:
            bar = self._bars[name] = tqdm(total=progress.total, desc=name, unit=progress.unit.rstrip("s"),
                                          file=self.out, position=len(self._bars), leave=True)
        bar.total = progress.total
        bar.n = progress.done  # a restarted worker starts again from 0
        bar.refresh()
