"""The progress display of the long-running tools (``noisynn bench``, ``noisynn audit``): one line per
finished step on stderr, with the step count and the seconds since the start."""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """Counts ``total`` steps and prints one line per step to stderr, nothing when ``quiet``.

    ``step(what)`` (or calling the object) counts a step and prints ``[done/total] seconds  what``;
    ``width`` right-aligns the step number to that many characters.  ``note(what)`` prints a line
    without counting a step.
    """

    def __init__(self, total: int, quiet: bool, *, width: int = 0):
        self.total, self.done, self.quiet, self.width = total, 0, quiet, width
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the display was created."""
        return time.perf_counter() - self.t0

    def step(self, what: str) -> None:
        """Count one finished step and print it."""
        self.done += 1
        if not self.quiet:
            print(f"[{self.done:>{self.width}}/{self.total}] {self.elapsed():6.1f}s  {what}", file=sys.stderr,
                  flush=True)

    __call__ = step

    def note(self, what: str) -> None:
        """Print ``what`` with the elapsed time, indented under the step lines, without counting a step."""
        if not self.quiet:
            print(f"          {self.elapsed():6.1f}s  {what}", file=sys.stderr, flush=True)
