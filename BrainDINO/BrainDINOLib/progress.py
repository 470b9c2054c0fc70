"""Progress of long work: tqdm bars on stderr for people; for programs that run the command line (the Slicer
module's background jobs), ``[progress] STAGE DONE/TOTAL`` lines (``--progress-lines``) that `Progress.parse` turns
back into events."""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass

PROGRESS_LINE = re.compile(r"^\[progress\] (?P<stage>.+) (?P<done>\d+)/(?P<total>\d+)$")


@dataclass(frozen=True)
class Progress:
    """A progress report for a GUI: ``done`` of ``total`` units of the named stage (0 of 0: under way)."""

    stage: str
    done: int
    total: int

    @classmethod
    def parse(cls, line: str) -> Progress | None:
        """The report a ``--progress-lines`` line carries (None for any other line)."""
        match = PROGRESS_LINE.match(line)
        return cls(match["stage"], int(match["done"]), int(match["total"])) if match else None


class _Reporter:
    """A tqdm bar drawn on first use and closed when the ``with`` block ends, or, with ``lines``, progress lines."""

    def __init__(self, *, lines: bool, disable: bool):
        self.lines, self.disable = lines, disable
        self._bar = None
        self._printed = 0.0

    def _print_line(self, text: str, final: bool) -> None:
        """``[progress] TEXT`` on stderr, at most one a second besides the final one."""
        now = time.monotonic()
        if not self.disable and (final or now - self._printed >= 1.0):
            print(f"[progress] {text}", file=sys.stderr, flush=True)
            self._printed = now

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()


class ProgressBar(_Reporter):
    """A ``progress(done, total)`` callback drawing a tqdm bar on stderr.

    The bar appears on the first report, so errors found before any work print alone. With ``lines``
    (``--progress-lines``) it prints ``[progress] STAGE DONE/TOTAL`` lines instead (`PROGRESS_LINE`), at most
    one a second.
    """

    def __init__(self, description: str, unit: str, *, lines: bool = False, disable: bool = False):
        super().__init__(lines=lines, disable=disable)
        self.description, self.unit = description, unit

    def __call__(self, done: int, total: int) -> None:
        if self.lines:
            self._print_line(f"{self.description} {done}/{total}", final=done >= total)
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(  # starts at ``done``: a resumed run's rate and ETA count only this run's work
                total=total, initial=done, unit=self.unit, desc=self.description, disable=self.disable, file=sys.stderr
            )
        self._bar.update(done - self._bar.n)


def download_progress_lines(name: str) -> type:
    """A tqdm class for huggingface_hub's download bar that reports ``[progress] downloading NAME (MB) DONE/TOTAL``
    lines instead (``--progress-lines``)."""
    from tqdm import tqdm

    report = ProgressBar(f"downloading {name} (MB)", "MB", lines=True)

    class ProgressLines(tqdm):
        def display(self, msg=None, pos=None):
            report(round(self.n / 1e6), round((self.total or 0) / 1e6))

    return ProgressLines


class CohortBar(_Reporter):
    """One progress bar across a cohort (`batch.CohortProgress`): scans done, slices/s and ETA on stderr; with
    ``--progress-lines``, ``[progress] scan K/N NAME DONE/TOTAL`` lines counting thousandths of a scan."""

    def __init__(self, count: int, *, lines: bool = False, disable: bool = False):
        super().__init__(lines=lines, disable=disable)
        self.count = count
        self._slices = 0
        self._last = (-1, 0)
        self._start = time.monotonic()

    def __call__(self, index: int, name: str, done: int, total: int) -> None:
        if total > 1 or done < total:  # not the end-of-scan mark (1 of 1) that skipped and failed scans get too
            self._slices += done - self._last[1] if self._last[0] == index else done
            self._last = (index, done)
        fraction = index + done / max(total, 1)
        if self.lines:
            position = min(index + 1, self.count)
            self._print_line(f"scan {position}/{self.count} {name} {round(1000 * fraction)}/{1000 * self.count}",
                             final=done >= total)  # fmt: skip
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.count, disable=self.disable, file=sys.stderr, desc="scans",
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total} [{elapsed}<{remaining}{postfix}]",
            )  # fmt: skip
        rate = self._slices / max(time.monotonic() - self._start, 1e-6)
        self._bar.set_postfix_str(f"{name}, {rate:.1f} slices/s", refresh=False)
        self._bar.update(fraction - self._bar.n)
