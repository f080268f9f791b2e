"""Training runs from the Slicer panel: launch them detached, watch, stop, resume and reuse them. Standard library
and the light mim3d modules only (no torch, qt or slicer).

    pid = start_run("pretrain", settings.to_args(), settings.out)      # outlives the panel and a Slicer restart
    watcher = RunWatcher(settings.out)
    snapshot = watcher.refresh()                                        # on a QTimer: state, progress, curves, log
    stop_run(settings.out); resume_run(settings.out)                    # STOP file; --resume
    register_model(finetune_run)                                        # the run's model/ into the model registry

The run folder (mim3d.runs) is what the panel reads, so a fresh `RunWatcher` re-attaches to a run that a previous
Slicer started. The worker creates the run folder itself, and refuses an `--out` that is not new or empty, so the
launcher's own files live beside it, in the hidden sibling folder `.<run name>.launch/` (`launch_dir`):

    launch.json     {"pid", "host", "command", "argv", "run_dir", "started" (epoch seconds), "returncode" (null until
                     the launching process saw the worker end), "stop_requested"}
    events.jsonl    the worker's stdout: protocol events (mim3d.protocol); its last error is the reason a launch
                     failed before the run wrote status.json (bad input: exit 2, and no run folder)
    stderr.txt      the worker's log on stderr (the same as the run's log.txt once the run has started)

A hidden sibling keeps the worker's `--out` checks and `list_runs` unchanged and the runs folder tidy; it is rewritten
by the next launch for the same run (a resume).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mim3d import registry
from mim3d.errors import BadInputError
from mim3d.processes import ProcessTree, is_running
from mim3d.protocol import parse_line
from mim3d.runs import (
    ACTIVE_STATES,
    RunDir,
    list_runs,
    now_iso,
    pretrained_checkpoint,  # noqa: F401 - the panel's "Use as encoder" (one rule with the CLI)
    read_json,
    read_status,
    request_stop,
    write_json_atomic,
)
from MiMSegmentationLib.worker import worker_command, worker_env

from .training_settings import format_duration, resume_args

LOG_TAIL_LINES = 20
TAIL_BYTES = 16384  # how much of the end of events.jsonl is searched for the worker's last event
TRAIN_KEYS_NOT_PLOTTED = {"kind", "step", "epoch", "lr", "samples_per_second", "time"}
PACKAGE_DIR = "model"  # mim3d.training.finetune_writer.PACKAGE_DIR (that module imports torch)
_launch_lock = threading.Lock()  # launch.json is updated by the reaper thread and by stop_run


# ---- detached launch ------------------------------------------------------------------------------------------------

def launch_dir(run_dir: str | os.PathLike) -> Path:
    """Where the launcher writes for `run_dir`: `.<name>.launch/` beside it (module docstring)."""
    run = Path(run_dir).absolute()
    return run.parent / f".{run.name}.launch"


def start_run(command: str, args: list[str], run_dir: str | os.PathLike, python: str | None = None,
              env: dict[str, str] | None = None) -> int:
    """Start `mim3d COMMAND ARGS` detached from this process, for the run in `run_dir` (the --out or --resume folder
    of `args`); returns the worker's pid.

    The worker gets a session of its own, no stdin and files instead of pipes, so closing the panel or Slicer neither
    signals nor blocks it. `env` adds to `worker_env()` (e.g. {"CUDA_VISIBLE_DEVICES": "-1"}).

    Raises:
        BadInputError: a worker started for this run is still running.
        OSError: the interpreter cannot be started.
    """
    folder = launch_dir(run_dir)
    previous = read_launch(run_dir)
    if previous is not None and _launch_alive(previous):
        raise BadInputError(f"{run_dir}: a worker started for this run is still running (pid {previous['pid']}); "
                            "stop it first")
    folder.mkdir(parents=True, exist_ok=True)
    argv = worker_command(command, args, python)
    with open(folder / "events.jsonl", "w", encoding="utf-8") as out, \
            open(folder / "stderr.txt", "w", encoding="utf-8") as err:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=worker_env(env),
                                   close_fds=True, **_detached())
    record = {"pid": process.pid, "host": socket.gethostname(), "command": command, "argv": argv,
              "run_dir": str(Path(run_dir).absolute()), "started": time.time(), "returncode": None,
              "stop_requested": False}
    with _launch_lock:
        write_json_atomic(folder / "launch.json", record)
    threading.Thread(target=_reap, args=(process, folder), daemon=True, name=f"mim3d-reap-{process.pid}").start()
    return process.pid


def _detached() -> dict:
    if os.name == "nt":  # no console, and Ctrl-C / Ctrl-Break in Slicer's console do not reach it
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.DETACHED_PROCESS}
    return {"start_new_session": True}  # no SIGHUP / SIGINT from Slicer's session or terminal


def _reap(process: subprocess.Popen, folder: Path) -> None:
    """Wait for the worker (so it leaves no zombie while Slicer runs) and record its exit code."""
    returncode = process.wait()
    _update_launch(folder, process.pid, returncode=returncode)


def _update_launch(folder: Path, pid: int, **fields) -> None:
    """Add `fields` to launch.json if it still records the launch of `pid` (not a later one for the same run)."""
    with _launch_lock:
        record = read_json(folder / "launch.json")
        if record is not None and record.get("pid") == pid:
            write_json_atomic(folder / "launch.json", {**record, **fields})


def read_launch(run_dir: str | os.PathLike) -> dict | None:
    """The launch record of `run_dir` (module docstring), or None when this panel never launched it."""
    return read_json(launch_dir(run_dir) / "launch.json")


def _launch_alive(record: dict) -> bool:
    """The launched worker still runs: no exit code recorded, and its pid lives in a process created by the time of
    the launch, so a pid reused after a Slicer restart is not taken for the worker (mim3d.processes.is_running).
    A worker launched on another host is assumed alive."""
    if record.get("returncode") is not None:
        return False
    if record.get("host") not in (None, socket.gethostname()):
        return True
    return is_running(record.get("pid"), created_by=record.get("started"))


# ---- watching -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSnapshot:
    """A run as the panel shows it, from its folder (and its launch record before the run has written one).

    Attributes:
        run_dir: the run folder.
        command: "pretrain" or "finetune" ("" when not known yet).
        state: one of mim3d.runs.STATES, or "missing" (neither a run nor a launch here).
        alive: the worker process runs (after a final state too, until it has exited: resume only then).
        epoch, epochs: the epoch in progress (1-based; the last one once ended) and the epochs of the schedule.
        step, total_steps: optimiser steps done and to do in all.
        fraction: step / total_steps, 0..1 (1 once finished).
        eta_seconds, eta: the worker's estimate of the time left, as seconds and as text ("12 min"; "" when none).
        message: the run's (or the failed launch's) message.
        last_checkpoint: absolute path of the last checkpoint, or None.
        series: curves by name -> (xs, ys): every loss term of the "train" lines against the step, and for fine-tuning
            "dice/<label>" and "mean_dice" of the "validation" lines against the epoch.
        log_tail: the last lines of the run's log (log.txt, or the worker's stderr when written later).
        model_package: a finished fine-tuning run's exported package folder, else None.
        best_mean_dice: fine-tuning's best validation mean Dice so far, else None.
        updated: when status.json was last written (ISO time), "" before.
    """

    run_dir: str
    command: str
    state: str
    alive: bool
    epoch: int
    epochs: int
    step: int
    total_steps: int
    fraction: float
    eta_seconds: float | None
    eta: str
    message: str
    last_checkpoint: str | None
    series: dict[str, tuple[tuple[float, ...], tuple[float, ...]]]
    log_tail: tuple[str, ...]
    model_package: str | None
    best_mean_dice: float | None
    updated: str


class RunWatcher:
    """Reads one run folder incrementally: each `refresh()` reads status.json, only the metrics.jsonl bytes added since
    the last call (starting over when `--resume` rewrote the file), and the end of log.txt."""

    def __init__(self, run_dir: str | os.PathLike, log_lines: int = LOG_TAIL_LINES):
        self.run = RunDir(Path(run_dir).absolute())
        self.log_lines = log_lines
        self.metrics_lines = 0  # complete metrics.jsonl lines read so far
        self._offset = 0  # bytes of metrics.jsonl read so far
        self._file_id: tuple[int, int] | None = None
        self._series: dict[str, tuple[list[float], list[float]]] = {}

    def refresh(self) -> RunSnapshot:
        status, launch = run_state(self.run.path)
        self._read_new_metrics()
        state = status["state"]
        command = status.get("command") or (launch or {}).get("command") or _config_command(self.run) or ""
        step, total = int(status.get("step") or 0), int(status.get("total_steps") or 0)
        epochs = int(status.get("epochs") or 0)
        eta = status.get("eta_seconds") if state in ACTIVE_STATES else None
        checkpoint = status.get("last_checkpoint")
        package = self.run.path / PACKAGE_DIR
        return RunSnapshot(
            run_dir=str(self.run.path), command=command, state=state, alive=bool(status.get("alive")),
            epoch=min(int(status.get("epoch") or 0) + 1, max(epochs, 1)), epochs=epochs, step=step,
            total_steps=total, fraction=1.0 if state == "finished" else (min(step / total, 1.0) if total else 0.0),
            eta_seconds=eta, eta=format_duration(eta) if eta is not None else "",
            message=str(status.get("message") or ""),
            last_checkpoint=str(self.run.path / checkpoint) if checkpoint else None,
            series={name: (tuple(xs), tuple(ys)) for name, (xs, ys) in self._series.items()},
            log_tail=self._log_tail(),
            model_package=str(package) if (command == "finetune" and state == "finished"
                                           and (package / "model.json").is_file()) else None,
            best_mean_dice=status.get("best_mean_dice"), updated=str(status.get("updated") or ""))

    def _read_new_metrics(self) -> None:
        try:
            stat = self.run.metrics.stat()
        except OSError:  # not written yet, or removed (a run that failed on bad input)
            self._reset(None)
            return
        file_id = (stat.st_dev, stat.st_ino)
        if file_id != self._file_id or stat.st_size < self._offset:  # --resume replaced it with the kept lines
            self._reset(file_id)
        if stat.st_size == self._offset:
            return
        with open(self.run.metrics, "rb") as f:
            f.seek(self._offset)
            chunk = f.read(stat.st_size - self._offset)
        complete = chunk[:chunk.rfind(b"\n") + 1]  # a last line still being written waits for the next refresh
        self._offset += len(complete)
        for line in complete.decode("utf-8", errors="replace").split("\n")[:-1]:
            self.metrics_lines += 1
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    self._add(entry)

    def _reset(self, file_id: tuple[int, int] | None) -> None:
        self._file_id, self._offset, self.metrics_lines, self._series = file_id, 0, 0, {}

    def _add(self, entry: dict) -> None:
        if entry.get("kind") == "train":
            points = {k: v for k, v in entry.items() if k not in TRAIN_KEYS_NOT_PLOTTED}
            x = entry.get("step")
        elif entry.get("kind") == "validation":
            points = {**{f"dice/{k}": v for k, v in (entry.get("dice") or {}).items()},
                      "mean_dice": entry.get("mean_dice")}
            x = entry.get("epoch")
        else:
            return
        for name, y in points.items():
            if _is_number(y) and _is_number(x):  # null: a NaN Dice or loss, nothing to plot
                xs, ys = self._series.setdefault(name, ([], []))
                xs.append(float(x))
                ys.append(float(y))

    def _log_tail(self) -> tuple[str, ...]:
        """The end of log.txt or of the worker's stderr, whichever was written last: stderr also holds what came
        before the run began (bad input) and tracebacks; log.txt is all there is for a run started elsewhere."""
        logs = [p for p in (self.run.log, launch_dir(self.run.path) / "stderr.txt") if p.is_file()]
        newest = max(logs, key=lambda p: p.stat().st_mtime, default=None)
        return tuple(tail_lines(newest, self.log_lines)) if newest else ()


def run_state(run_dir: str | os.PathLike) -> tuple[dict, dict | None]:
    """(status, launch record): mim3d.runs.read_status, or where the run has not written status.json since its latest
    launch, a status made from the launch: "starting" while the worker runs, else "failed" with the worker's message
    (or "stopped" when `stop_run` ended it before it began)."""
    run = RunDir(Path(run_dir).absolute())
    status, launch = read_status(run.path), read_launch(run.path)
    if launch is None or not _status_older_than(run, launch):
        if launch is not None and status["state"] not in ACTIVE_STATES:
            status["alive"] = _launch_alive(launch)  # the worker exits a moment after writing its final state
        return status, launch
    alive = _launch_alive(launch)
    made = {"state": "starting", "pid": launch.get("pid"), "host": launch.get("host"), "alive": alive,
            "command": launch.get("command"), "updated": now_iso(), "message": "starting the worker"}
    if status["state"] != "missing":  # a resume: keep the run's counters and checkpoint
        made = {**status, **made}
    events = [parse_line(line) for line in tail_lines(launch_dir(run.path) / "events.jsonl", 50, TAIL_BYTES)]
    events = [e for e in events if e is not None]
    if alive:
        progress = [e for e in events if e["type"] == "progress"]
        if progress:
            made["message"] = f"{progress[-1]['stage']}: {progress[-1].get('message', '')}".rstrip(": ")
        return made, launch
    errors = [e for e in events if e["type"] == "error"]
    if launch.get("stop_requested") and not errors:
        message = ("stopped before the resumed run began; resume it again to continue" if status["state"] != "missing"
                   else "stopped before the run began (nothing was written)")
        return {**made, "state": "stopped", "message": message}, launch
    if errors:
        message = str(errors[-1].get("message"))
    else:
        code = launch.get("returncode")
        how = f"exited with code {code}" if code is not None else "ended"
        last = "\n".join(tail_lines(launch_dir(run.path) / "stderr.txt", 10))
        message = f"the worker {how} before the run began" + (f"; its last log lines:\n{last}" if last else "")
    return {**made, "state": "failed", "message": message}, launch


def _status_older_than(run: RunDir, launch: dict) -> bool:
    """status.json is missing, or was written before the latest launch started (so it speaks of an earlier one)."""
    try:
        return run.status.stat().st_mtime < float(launch.get("started") or 0)
    except OSError:
        return True


def _config_command(run: RunDir) -> str | None:
    config = read_json(run.config)
    return config.get("command") if config else None


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def tail_lines(path: str | os.PathLike, count: int, max_bytes: int | None = None) -> list[str]:
    """The last `count` lines of a text file, read backwards from its end in blocks (at most `max_bytes` of it);
    [] when it cannot be read."""
    block, data = 4096, b""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            position = end
            budget = end if max_bytes is None else min(end, max_bytes)
            while position > end - budget and data.count(b"\n") <= count:
                step = min(block, position - (end - budget))
                position -= step
                f.seek(position)
                data = f.read(step) + data
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if position > 0 and lines:
        lines = lines[1:]  # the first one is cut
    return lines[-count:] if count else []


# ---- the re-attach list ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecentRun:
    """One entry of the panel's re-attach list."""

    run_dir: str
    command: str
    state: str
    updated: str  # ISO time of the last status (or of the launch, for a run still starting)
    message: str
    alive: bool


def list_recent_runs(parent_dirs: list[str | os.PathLike]) -> list[RecentRun]:
    """The runs directly inside each folder of `parent_dirs` (mim3d.runs.list_runs), plus runs still being started
    there (their folder not written yet), newest first."""
    found = {}
    for parent in map(Path, parent_dirs):
        for entry in list_runs(parent):
            found[entry["run_dir"]] = None
        hidden = parent.glob(".*.launch") if parent.is_dir() else []
        for folder in hidden:
            run_dir = str(parent / folder.name[1:].removesuffix(".launch"))
            record = read_json(folder / "launch.json")
            if run_dir not in found and record is not None and _launch_alive(record):
                found[run_dir] = None
    recent = []
    for run_dir in found:
        status, launch = run_state(run_dir)
        command = status.get("command") or (launch or {}).get("command") or ""
        recent.append(RecentRun(run_dir, str(command), status["state"], str(status.get("updated") or ""),
                                str(status.get("message") or ""), bool(status.get("alive"))))
    return sorted(recent, key=lambda r: r.updated, reverse=True)


# ---- stop and resume ------------------------------------------------------------------------------------------------

def stop_run(run_dir: str | os.PathLike) -> bool:
    """Ask the run to stop: its STOP file (it finishes the step, saves checkpoints/last.pt and ends "stopped"), or,
    while the worker has not begun the run yet, SIGTERM to the worker. False when nothing runs there."""
    run = RunDir(Path(run_dir).absolute())
    status, launch = run_state(run.path)
    if status["state"] not in ACTIVE_STATES or not status.get("alive"):
        return False
    if run.status.exists() and (launch is None or not _status_older_than(run, launch)):
        request_stop(run.path)
        return True
    # Before the run has written status.json it has not installed its stop handling (a STOP file would be deleted
    # as stale); SIGTERM ends it there, and is a clean stop once the run has begun. The whole tree: PythonSlicer is a
    # launcher that runs Python as its child. Where no stop request can be delivered (Windows: the detached worker
    # has no console for CTRL_BREAK_EVENT), the tree is killed.
    _update_launch(launch_dir(run.path), launch["pid"], stop_requested=True)
    tree = ProcessTree(int(launch["pid"]), created_by=launch.get("started"))
    if not tree.terminate():
        tree.kill()
    return True


def resume_run(run_dir: str | os.PathLike, python: str | None = None) -> int:
    """Continue a stopped or failed run from its last checkpoint (`mim3d COMMAND --resume RUN_DIR`, detached);
    the worker's pid. Raises BadInputError for a folder that is not a mim3d run."""
    run = RunDir(Path(run_dir).absolute())
    command = _config_command(run)
    if command not in ("pretrain", "finetune"):
        raise BadInputError(f"{run.path}: not a mim3d training run (no readable config.json); nothing to resume")
    return start_run(command, resume_args(run.path), run.path, python)


# ---- reuse ----------------------------------------------------------------------------------------------------------

def register_model(run_dir: str | os.PathLike, model_id: str | None = None, home: Path | None = None) -> Path:
    """Install a fine-tuning run's model package (RUN_DIR/model) in the model registry, so the Segment panel lists it;
    the installed folder. The id defaults to the run folder's name, made a valid id (lower case, '-' for others).

    Raises:
        BadInputError: not a fine-tuning run, a run still active, no package, or an id already installed.
    """
    run = RunDir(Path(run_dir).absolute())
    command = _config_command(run)
    if command != "finetune":
        what = f"a {command} run" if command else "not a mim3d run"
        raise BadInputError(f"{run.path}: {what}; only a fine-tuning run has a model to use for segmentation")
    state = read_status(run.path)["state"]
    if state in ACTIVE_STATES:
        raise BadInputError(f"{run.path}: the run is still {state}; wait until it has finished (or stop it)")
    package = run.path / PACKAGE_DIR
    if not (package / "model.json").is_file():
        raise BadInputError(f"{run.path}: no model package yet (the run exports model/ at its first validation)")
    return registry.import_package(package, model_id or default_model_id(run.path), home)


def default_model_id(run_dir: str | os.PathLike) -> str:
    """A registry id from a run folder's name: "Liver run 2" -> "liver-run-2"."""
    text = re.sub(r"[^a-z0-9._-]+", "-", Path(run_dir).name.lower()).lstrip("._-")[:64].rstrip("-")
    return text or "fine-tuned-model"
