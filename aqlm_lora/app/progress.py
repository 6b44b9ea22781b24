"""Progress lines for logs: ``--log-every N`` prints one line per N steps/batches on stderr.

Progress bars are drawn on a terminal only (tqdm, ``disable=None``), so a run whose stderr goes
to a file or a job log showed nothing until it ended; these lines show there too. They go
through ``tqdm.write``, which keeps a bar on the terminal intact.
"""

from __future__ import annotations

import sys
import time
from typing import Optional


def format_eta(seconds: float) -> str:
    """``H:MM:SS`` (``?`` while unknown)."""
    if not seconds >= 0 or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressLog:
    """One line every ``every`` units (steps, batches) from ``first`` to ``end``; ``every`` 0: silent.

    A line reads ``<label> <unit> 20/100  <fields>  12,345 tokens/s  ETA 0:01:05``; the speed is
    over the units since the previous line, the ETA from the mean time per unit of this run.
    """

    def __init__(self, label: str, unit: str, first: int, end: int, every: int, tokens_per_unit: int) -> None:
        self.label, self.unit = label, unit
        self.first, self.end, self.every = first, end, every
        self.tokens_per_unit = tokens_per_unit
        self.started = self.last_time = time.perf_counter()
        self.last_position = first

    def due(self, position: int) -> bool:
        """Whether ``position`` (units done, counted from 0 over all runs) gets a line."""
        return self.every > 0 and position > self.first and position % self.every == 0

    def line(self, position: int, fields: str, now: Optional[float] = None) -> str:
        now = time.perf_counter() if now is None else now
        speed = (position - self.last_position) * self.tokens_per_unit / max(now - self.last_time, 1e-9)
        per_unit = (now - self.started) / max(position - self.first, 1)
        eta = format_eta(per_unit * (self.end - position))
        self.last_position, self.last_time = position, now
        return f"{self.label} {self.unit} {position}/{self.end}  {fields}  {speed:,.0f} tokens/s  ETA {eta}"

    def update(self, position: int, fields: str) -> None:
        """Print the line for ``position`` if it is due."""
        if self.due(position):
            write(self.line(position, fields))


class LossLines:
    """The lines of a training run: at each due step, the mean loss since the previous line.

    Call it with the loop's result (``global_step``, ``losses``) after every step.
    """

    def __init__(self, log: ProgressLog) -> None:
        self.log = log
        self.logged = 0  # losses already summarised in a line

    def __call__(self, result) -> None:
        step = result.global_step
        if self.log.due(step):
            recent = result.losses[self.logged :]
            self.log.update(step, f"loss {sum(recent) / len(recent):.4f}")
            self.logged = len(result.losses)


def write(line: str) -> None:
    """A line on stderr, above any progress bar, flushed (a log sees it at once)."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()
