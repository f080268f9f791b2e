"""Run `mim3d` worker commands from Slicer without blocking its GUI thread. Standard library, mim3d.protocol and
mim3d.processes only.

    job = WorkerJob(worker_command("segment", [ct, "--model", model_id, "--output", seg]),
                    schedule=qt.QTimer.singleShot, on_event=panel.on_event, on_finished=onFinished)
    job.start()      # returns at once; events arrive on the GUI thread through `schedule`
    job.cancel()     # SIGTERM to the worker's process tree (it exits 130), the whole tree killed after a grace

Reader threads only queue lines; `poll()`, run on the caller's thread, parses and delivers them, so no callback ever
runs on another thread. The worker's protocol is mim3d.protocol: JSON event lines on stdout, logs on stderr.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mim3d
from mim3d.processes import ProcessTree
from mim3d.protocol import EXIT_OK, parse_line

LOG_TAIL_LINES = 50
STREAM_DRAIN_S = 2.0  # after the worker exits, how long to wait for descendants that still hold its pipes open


def worker_command(command: str, args: Sequence[str], python: str | None = None) -> list[str]:
    """``[python, "-m", "mim3d", command, *args]``; ``python`` defaults to ``default_python()``."""
    return [python or default_python(), "-m", "mim3d", command, *map(str, args)]


def default_python() -> str:
    """The interpreter for workers: PythonSlicer beside ``sys.executable``, else PythonSlicer on PATH when running
    inside Slicer (its ``slicer`` module is loaded), else ``sys.executable``."""
    beside = shutil.which("PythonSlicer", path=str(Path(sys.executable).parent))
    if beside:
        return beside
    on_path = shutil.which("PythonSlicer") if "slicer" in sys.modules else None
    return on_path or sys.executable


def worker_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``os.environ`` in which the worker imports this ``mim3d`` (its folder first on PYTHONPATH), writes
    unbuffered UTF-8, plus ``extra`` (e.g. ``{"CUDA_VISIBLE_DEVICES": "-1"}``)."""
    env = dict(os.environ)
    library = str(Path(mim3d.__file__).resolve().parent.parent)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != library]
    env.update(PYTHONPATH=os.pathsep.join([library, *paths]), PYTHONUNBUFFERED="1", PYTHONUTF8="1")
    env.update(extra or {})
    return env


def launch(args: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None) -> subprocess.Popen:
    """Start ``args`` with UTF-8 line-buffered stdout and stderr pipes, in a process group of its own (so that
    ``stop_process_tree`` reaches its children). Raises OSError when the program cannot be started."""
    if os.name == "nt":
        hidden = subprocess.STARTUPINFO()
        hidden.dwFlags |= subprocess.STARTF_USESHOWWINDOW  # wShowWindow 0 = SW_HIDE: no console window flashes up
        platform = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP, "startupinfo": hidden}
    else:
        platform = {"start_new_session": True}
    return subprocess.Popen(list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, encoding="utf-8", errors="replace", bufsize=1, env=env, cwd=cwd, **platform)


def stop_process_tree(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Ask ``process`` and its descendants to stop (mim3d cleans up and exits 130), wait up to ``grace_s``, then kill
    whatever of the tree is left, descendants the process left behind included. Blocks until the process has ended.
    How the tree is found and signalled on each platform: mim3d.processes.ProcessTree."""
    tree = ProcessTree(process.pid)
    _kill_after(process, tree, grace_s if tree.terminate() else 0.0)


def _kill_after(process: subprocess.Popen, tree: ProcessTree, grace_s: float) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    tree.kill()  # also when the worker itself has exited: descendants it left must not outlive the job
    process.wait()


@dataclass(frozen=True)
class JobOutcome:
    """How a worker process ended.

    Attributes:
        returncode: the exit code (mim3d.protocol: 0, 1, 2, 130), or minus the signal number that ended it (POSIX).
        cancelled: ``cancel()`` was called while it ran, or it reported a "cancelled" error, and it did not exit 0.
        result: the last "result" event, or None.
        error: the last "error" event, or None.
        message: plain words for the user: "Finished.", "Cancelled…", the worker's error message, or for a crash
            without an error event the exit code and the last log lines.
        log_tail: the last ``LOG_TAIL_LINES`` log lines (stderr, and stdout lines that are not protocol events).
        elapsed_s: seconds from ``start()`` until the job finished.
    """

    returncode: int
    cancelled: bool
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    message: str
    log_tail: tuple[str, ...]
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == EXIT_OK


class WorkerJob:
    """One worker process, watched without blocking the GUI thread.

    Args:
        args: the command line (``worker_command(...)``).
        env: its environment; None: ``worker_env()``.
        launch: ``launch(args, env=..., cwd=...) -> Popen``; a Popen without a stderr pipe (merged) also works.
        schedule: ``schedule(ms, fn)`` runs ``fn`` on the GUI thread later (``qt.QTimer.singleShot``); the job then
            polls itself every ``poll_ms``. None: the caller calls ``poll()`` or ``wait()``.
        on_event: each protocol event (dict), in the order the worker wrote them.
        on_log: each log line (stderr, and stdout lines that are not events), without its newline.
        on_finished: called once with the ``JobOutcome`` after the process has exited and its output was delivered.
        cancel_grace_s: how long ``cancel()`` lets the worker clean up before the tree is killed.

    ``outcome`` holds the JobOutcome once the job has finished (None before).
    """

    def __init__(self, args: Sequence[str], env: Mapping[str, str] | None = None, *,
                 launch: Callable[..., subprocess.Popen] = launch,
                 schedule: Callable[[int, Callable[[], None]], None] | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 on_log: Callable[[str], None] | None = None,
                 on_finished: Callable[[JobOutcome], None] | None = None,
                 poll_ms: int = 200, cwd: str | None = None, cancel_grace_s: float = 10.0):
        self.args, self.env, self.cwd = list(args), env, cwd
        self._launch, self._schedule, self.poll_ms, self.cancel_grace_s = launch, schedule, poll_ms, cancel_grace_s
        self._on_event = on_event or (lambda event: None)
        self._on_log = on_log or (lambda line: None)
        self._on_finished = on_finished or (lambda outcome: None)
        self._process: subprocess.Popen | None = None
        self._lines: queue.SimpleQueue[tuple[str, str | None]] = queue.SimpleQueue()
        self._open_streams: set[str] = set()
        self._tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self._result = self._error = None
        self._started_at = self._exited_at = None
        self._cancel_requested = False
        self.outcome: JobOutcome | None = None

    @property
    def running(self) -> bool:
        """Started and not yet finished (``on_finished`` not yet called)."""
        return self._process is not None and self.outcome is None

    @property
    def elapsed_s(self) -> float:
        """Seconds since ``start()``; fixed once the job has finished; 0 before it starts."""
        if self.outcome is not None:
            return self.outcome.elapsed_s
        return 0.0 if self._started_at is None else time.monotonic() - self._started_at

    def start(self) -> None:
        """Launch the process and its reader threads, and begin polling through ``schedule``. Raises OSError when the
        program cannot be started, RuntimeError when this job was started before."""
        if self._process is not None:
            raise RuntimeError("a WorkerJob runs once; make a new one")
        self._process = self._launch(self.args, env=worker_env() if self.env is None else self.env, cwd=self.cwd)
        self._started_at = time.monotonic()
        for name, stream in (("stdout", self._process.stdout), ("stderr", self._process.stderr)):
            if stream is not None:
                self._open_streams.add(name)
                threading.Thread(target=self._read, args=(name, stream), daemon=True,
                                 name=f"mim3d-{name}-{self._process.pid}").start()
        if self._schedule is not None:
            self._schedule(self.poll_ms, self._tick)

    def cancel(self) -> None:
        """Ask the running worker to stop (``stop_process_tree`` without blocking: the signal now, the kill after
        ``cancel_grace_s`` in a background thread). The outcome then has ``cancelled`` True unless the worker still
        exits 0. Does nothing when the process has already exited."""
        if not self.running or self._process.poll() is not None or self._cancel_requested:
            return
        self._cancel_requested = True
        tree = ProcessTree(self._process.pid)
        grace_s = self.cancel_grace_s if tree.terminate() else 0.0
        threading.Thread(target=_kill_after, args=(self._process, tree, grace_s), daemon=True,
                         name=f"mim3d-stop-{self._process.pid}").start()

    def poll(self) -> None:
        """Deliver, on this thread and in order, what the worker wrote since the last call; once it has exited and
        both streams are drained, call ``on_finished``. Does nothing after that."""
        if not self.running:
            return
        while True:
            try:
                stream, line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._open_streams.discard(stream)
            else:
                self._deliver(stream, line)
        returncode = self._process.poll()
        if returncode is None:
            return
        if self._open_streams:  # a descendant may still hold a pipe: give the reader a moment, not forever
            self._exited_at = self._exited_at or time.monotonic()
            if time.monotonic() - self._exited_at < STREAM_DRAIN_S:
                return
        self._finish(returncode)

    def wait(self, timeout_s: float | None = None) -> JobOutcome:
        """Poll until the started job has finished (for scripts, tests and headless logic); its outcome. Raises
        TimeoutError after ``timeout_s`` (the worker keeps running; ``cancel()`` it if it must stop), RuntimeError
        when the job was not started."""
        if self._process is None:
            raise RuntimeError("start() the WorkerJob before waiting for it")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.poll()
        while self.outcome is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the worker is still running after {timeout_s:g} s")
            time.sleep(min(self.poll_ms, 50) / 1000)
            self.poll()
        return self.outcome

    def _tick(self) -> None:
        try:
            self.poll()
        finally:  # a callback that raises must not stop the polling
            if self.running:
                self._schedule(self.poll_ms, self._tick)

    def _read(self, name: str, stream) -> None:
        """Reader thread: queue every line of ``stream``, then None; never calls a callback."""
        try:
            for line in stream:
                self._lines.put((name, line.rstrip("\r\n")))
        finally:
            self._lines.put((name, None))

    def _deliver(self, stream: str, line: str) -> None:
        event = parse_line(line) if stream == "stdout" else None
        if event is None:
            self._tail.append(line)
            self._on_log(line)
            return
        if event["type"] == "result":
            self._result = event
        elif event["type"] == "error":
            self._error = event
        self._on_event(event)

    def _finish(self, returncode: int) -> None:
        cancelled = returncode != EXIT_OK and (
            self._cancel_requested or (self._error is not None and self._error.get("kind") == "cancelled"))
        self.outcome = JobOutcome(returncode=returncode, cancelled=cancelled, result=self._result, error=self._error,
                                  message=_summary(returncode, cancelled, self._error, tuple(self._tail)),
                                  log_tail=tuple(self._tail), elapsed_s=time.monotonic() - self._started_at)
        if not self._open_streams:  # both readers are done with their pipes
            for stream in (self._process.stdout, self._process.stderr):
                if stream is not None:
                    stream.close()
        self._on_finished(self.outcome)


def _summary(returncode: int, cancelled: bool, error: dict[str, Any] | None, tail: tuple[str, ...]) -> str:
    """``JobOutcome.message``."""
    if returncode == EXIT_OK:
        return "Finished."
    if cancelled:
        reason = error.get("message") if error is not None and error.get("kind") == "cancelled" else None
        return f"Cancelled ({reason})." if reason else "Cancelled."
    if error is not None and error.get("message"):
        return str(error["message"])
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        how = f"was stopped by {name}" + (" (often: the computer ran out of memory)" if name == "SIGKILL" else "")
    else:
        how = f"exited with code {returncode}"
    last = "\n".join(tail[-10:])
    return f"The worker {how} without reporting an error." + (f" Its last log lines:\n{last}" if last else "")
