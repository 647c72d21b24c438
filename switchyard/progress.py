"""One small progress display for the commands that take a while (send, rebuilds, export, demo).

On a terminal it redraws one bar line on stderr (at most ten times a second);
otherwise (a log file, CI) it prints a plain line every ``interval`` seconds, so
a long run shows it is alive without flooding the file. No dependency: a bar
with a rate and an ETA is forty lines, and tqdm would be one more package in
every install for it.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import IO

MIN_RATE_S = 1.0
BAR_WIDTH = 28


class Progress:
    """``done`` of ``total`` (None when unknown) ``unit``s; ``echo`` prints a line without tearing the bar."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        unit: str = "",
        stream: IO[str] | None = None,
        interval: float = 5.0,
        tty: bool | None = None,
    ) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream) if tty is None else tty
        self.interval = 0.1 if self.tty else interval
        self.done = 0
        self.started = time.monotonic()
        self._shown_at = 0.0
        self._drawn = False
        self._closed = False
        self._lock = threading.Lock()  # a rebuild reports from a worker thread

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n)

    def update(self, done: int, total: int | None = None) -> None:
        with self._lock:
            self.done = done
            if total is not None:
                self.total = total
            now = time.monotonic()
            if now - self._shown_at >= self.interval:
                self._shown_at = now
                self._show()

    def echo(self, line: str, out: IO[str] | None = None) -> None:
        """Print ``line`` (to ``out``, default stdout) above the bar."""
        out = out if out is not None else sys.stdout
        with self._lock:
            self._clear()
            out.write(line + "\n")
            out.flush()
            if self.tty and not self._closed:
                self._show()

    def close(self, failed: bool = False) -> None:
        """The final state, once (a bar ends with a newline; a plain run with its last line).

        ``failed``: no final line (the error says what happened); a drawn bar is ended.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if failed:
                if self._drawn:
                    self.stream.write("\n")
                    self.stream.flush()
                return
            self._show(final=True)
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(failed=exc_type is not None)

    def text(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        unit = f" {self.unit}" if self.unit else ""
        # Under a second a rate says nothing (work done before the bar started shows as
        # thousands per second): counts only until there is a second to divide by.
        timed = elapsed >= MIN_RATE_S
        if self.total:
            part = min(self.done / self.total, 1.0)
            left = (self.total - self.done) / rate if rate > 0 and self.done < self.total else 0.0
            bar = "#" * int(part * BAR_WIDTH) + "-" * (BAR_WIDTH - int(part * BAR_WIDTH))
            head = f"[{bar}] " if self.tty else ""
            tail = f" {rate:.1f}/s, {elapsed:.0f}s elapsed, ~{left:.0f}s left" if timed else ""
            return f"{self.label}: {head}{self.done}/{self.total}{unit} {part:4.0%}{tail}"
        tail = f" {rate:.1f}/s, {elapsed:.0f}s elapsed" if timed else ""
        return f"{self.label}: {self.done}{unit}{tail}"

    def _show(self, final: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + self.text())
            self._drawn = True
        elif final or self.done:
            self.stream.write(self.text() + "\n")
        self.stream.flush()

    def _clear(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
