"""Run BrainDINO commands in a background process (``PythonSlicer`` inside Slicer) for both Slicer modules.

A Python thread inside Slicer runs only while the GUI thread runs Python (nothing releases the GIL around
Qt's event loop), so long work goes to a child process: ``python -m MODULE --progress-lines COMMAND ...``
(``BrainDINOLib`` for inference, ``BrainDINOTrainingLib`` for training) in its own process group, without a
console window on Windows. A thread turns its output into typed events on a queue that the GUI drains from
a timer. Cancel ends the whole process tree (data-loader and indexing workers included). Several commands
(e.g. ``index`` then ``pretrain``) run in order; the first failure stops the rest. Standard library only.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .progress import Progress


@dataclass(frozen=True)
class LogLine:
    text: str


@dataclass(frozen=True)
class JobEnded:
    """The job is over: ``code`` 0 on success (never 0 when cancelled); ``cancelled`` when `BackgroundJob.cancel`
    ended it."""

    code: int
    cancelled: bool


JobEvent = Progress | LogLine | JobEnded


class BackgroundJob:
    """Commands of a BrainDINO command line run one after another in a child process.

    Args:
        commands: argument lists, e.g. ``[["index", "data/", "-o", "idx"], ["pretrain", "--data", "idx", ...]]``.
        module: the command line: ``BrainDINOLib`` (inference) or ``BrainDINOTrainingLib`` (everything).
        python: the interpreter (Slicer's ``PythonSlicer``; ``sys.executable`` elsewhere).
        python_path: folders holding ``BrainDINOLib`` and ``BrainDINOTrainingLib``, prepended to PYTHONPATH.
        env: the child's environment (inside Slicer: ``slicer.util.startupEnvironment()``).
    """

    def __init__(
        self,
        commands: Sequence[Sequence[str]],
        *,
        module: str,
        python: str = sys.executable,
        python_path: Sequence[str | Path] = (),
        env: dict[str, str] | None = None,
    ):
        if not commands:
            raise ValueError("no command to run")
        self.commands = [list(c) for c in commands]
        self.module = module
        self.python = python
        self.env = dict(os.environ if env is None else env)
        if python_path:
            paths = [str(p) for p in python_path] + [p for p in self.env.get("PYTHONPATH", "").split(os.pathsep) if p]
            self.env["PYTHONPATH"] = os.pathsep.join(paths)
        self.env["PYTHONUNBUFFERED"] = "1"
        self._events: queue.Queue = queue.Queue()
        self._process: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._cancelled = threading.Event()
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> BackgroundJob:
        self._thread = threading.Thread(target=self._run_all, name="BrainDINO background job", daemon=True)
        self._thread.start()
        return self

    def _run_all(self) -> None:
        code = 0
        try:
            for command in self.commands:
                code = self._run_one([self.python, "-m", self.module, "--progress-lines", *command])
                if code != 0:
                    break
        except OSError as error:  # the interpreter could not be started
            self._events.put(LogLine(f"cannot start {self.python}: {error}"))
            code = 127
        finally:
            cancelled = self._cancelled.is_set()
            self._events.put(JobEnded(code or (-1 if cancelled else 0), cancelled))

    def _run_one(self, argv: list[str]) -> int:
        """Exit code of one command (-1 when cancelled before it started)."""
        with self._lock:
            if self._cancelled.is_set():
                return -1
            self._events.put(LogLine("$ " + " ".join(["PythonSlicer", *argv[1:]])))
            self._process = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                **_own_process_group(),
            )
        with self._process as process:
            for line in process.stdout:
                line = line.rstrip("\n")
                progress = Progress.parse(line)
                if progress or line:
                    self._events.put(progress or LogLine(line))
            code = process.wait()
        return -1 if self._cancelled.is_set() and code == 0 else code

    def poll(self) -> list[JobEvent]:
        """Events since the last call (never blocks)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def wait(self, timeout: float | None = None) -> list[JobEvent]:
        """Block until the job ends; returns every event not yet polled."""
        self._thread.join(timeout)
        return self.poll()

    def cancel(self, grace: float = 5.0) -> None:
        """End the running command and every process it started (asked politely, then killed after ``grace``
        seconds); later commands do not start. Returns at once."""
        with self._lock:
            self._cancelled.set()
            process = self._process
        if process is None or process.poll() is not None:
            return
        _signal_tree(process, signal.SIGTERM)
        if os.name != "nt":  # processes that ignore SIGTERM, or outlive their parent, are killed
            kill = threading.Timer(grace, _signal_tree, (process, signal.SIGKILL))
            kill.daemon = True
            kill.start()


def _own_process_group() -> dict:
    if os.name == "nt":  # no console window either (as slicer.util.launchConsoleProcess hides it)
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}


def _signal_tree(process: subprocess.Popen, sig: int) -> None:
    if os.name == "nt":  # taskkill /T ends the whole tree
        quiet = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, creationflags=quiet)
        return
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
