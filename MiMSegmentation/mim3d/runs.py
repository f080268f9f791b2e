"""Training-run folders: the layout, atomic writes, and reading a run from another process. Standard library only,
so the Slicer panel can watch a run (and re-attach to one that outlived a Slicer restart) without importing torch.

A run is a folder written by `mim3d pretrain` (and `mim3d finetune`) from rank 0 only:

    config.json        the fully resolved configuration, written once before the first step:
                       {"command": "pretrain", "created": ISO time, "versions": {"mim3d", "torch", "python"},
                        "options": {every command-line option, resolved; `--resume` reads these back},
                        "model": {"method", "preset", "config": {every model config field}},
                        "data": {"folders": [...], "summary": {...}, "volumes": [paths]},
                        "optimization": {"effective_batch", "base_lr", "lr", "steps_per_epoch", "total_steps", ...},
                        "runtime": {"device", "precision", "world_size"}}
    status.json        replaced atomically at every state change, after each checkpoint, and at most once a second
                       while running:
                       {"state": one of STATES, "pid": int, "host": str, "command": str, "epoch": int (0-based,
                        the epoch in progress), "epochs": int, "step": int (optimiser steps done), "total_steps": int,
                        "eta_seconds": float | null, "steps_per_second": float | null, "loss": float | null,
                        "last_checkpoint": "checkpoints/last.pt" | null (relative to the run folder),
                        "updated": ISO time (UTC), "message": str}
    metrics.jsonl      one JSON object per line, appended and flushed, never rewritten except on `--resume`, which
                       drops the lines logged after the checkpoint it resumes from:
                       {"kind": "train", "step": int, "epoch": float (epochs done, step / steps per epoch),
                        "lr": float, "loss": float, ...one float per loss term..., "samples_per_second": float (all
                        processes), "time": ISO time}: every --log-every steps, plus the first and the last step;
                        values are the step's means over its volumes and processes
                       {"kind": "epoch", "step": int, "epoch": int (0-based index of the epoch just completed),
                        "loss": float, ...means over the epoch's steps (those run by this process, after a resume)}
    log.txt            the human log (what the worker also prints on stderr)
    tensorboard/       TensorBoard event files: the "train" scalars per logged step, "epoch" means per epoch
    checkpoints/       last.pt (every epoch end, at a stop and at the end), epoch-N.pt (every --checkpoint-every
                       epochs, N 1-based), best.pt (fine-tuning only: the best validation score); mim3d checkpoints
                       (mim3d.models.checkpoints, readable with weights_only=True) holding "method", "config" (the
                       model's), "model", "optimizer", "scaler", "step", "epoch", "data_position", "rng" (per rank)
                       and "run" (the options); the learning rate is a function of "step", so there is no scheduler
    STOP               created by `request_stop` (or by hand): the run finishes its step, saves last.pt, and ends
                       with state "stopped"

States: "starting" (validating, building, loading) -> "running" -> "finished", or -> "stopping" -> "stopped" on a stop
request, or "failed" (with the reason in "message"). `read_status` reports a run whose process has died while active
as "failed" (with "alive": false), so a reader never waits on a run that was killed.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import BadInputError
from .presets import ENCODER_ARCH
from .processes import is_running

STATES = ("starting", "running", "stopping", "stopped", "finished", "failed")
ACTIVE_STATES = ("starting", "running", "stopping")


class RunDir:
    """Where each file of a run lives (nothing is created by constructing one)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def status(self) -> Path:
        return self.path / "status.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def log(self) -> Path:
        return self.path / "log.txt"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def stop_file(self) -> Path:
        return self.path / "STOP"

    def checkpoint(self, name: str) -> Path:
        """checkpoints/<name>.pt, e.g. name "last", "best" or "epoch-10"."""
        return self.checkpoints / f"{name}.pt"

    def holds_run(self) -> bool:
        return self.config.exists() or self.status.exists()


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as JSON so that a reader sees the old file or the complete new one, never a partial one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | os.PathLike) -> dict | None:
    """The JSON object in `path`, or None when it is missing or not a JSON object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_status(run_dir: str | os.PathLike) -> dict:
    """The run's status.json, with "alive" added for active states (see `is_alive`).

    A run that is active on this host but whose process is gone is reported as "failed" with "alive": false and a
    message saying so. A folder without status.json gives {"state": "missing", "message": ...}.
    """
    status = read_json(RunDir(run_dir).status)
    if status is None:
        return {"state": "missing", "message": f"{run_dir}: no readable status.json (not a run, or not started yet)"}
    if status.get("state") in ACTIVE_STATES:
        status["alive"] = is_alive(status)
        if not status["alive"]:
            status["message"] = (f"the process ({status.get('pid')}) ended while the run was {status['state']} "
                                 "(killed or crashed); resume it from its last checkpoint with --resume")
            status["state"] = "failed"
    return status


def is_alive(status: dict) -> bool:
    """Whether the process named by status["pid"] still runs and is the one that wrote `status`: a pid reused by a
    process started after status["updated"] is not (mim3d.processes). Processes on another host are assumed alive."""
    pid = status.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if status.get("host") not in (None, socket.gethostname()):
        return True
    try:
        written = datetime.fromisoformat(str(status.get("updated"))).timestamp()
    except ValueError:
        written = None
    return is_running(pid, created_by=written)


def read_metrics(run_dir: str | os.PathLike, since_line: int = 0) -> list[dict]:
    """The metrics.jsonl entries from line `since_line` (0-based) on.

    Only complete lines are returned: a last line still being written (no newline yet) is left for the next call,
    so `since_line + len(result)` is where the next call continues. A complete line that is not a JSON object is
    returned as {"kind": "unreadable", "text": line} to keep that count right.
    """
    try:
        text = RunDir(run_dir).metrics.read_text(encoding="utf-8")
    except OSError:
        return []
    lines = text.split("\n")[:-1]  # the piece after the last newline is empty or partial
    entries = []
    for line in lines[since_line:]:
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        entries.append(entry if isinstance(entry, dict) else {"kind": "unreadable", "text": line})
    return entries


def request_stop(run_dir: str | os.PathLike) -> Path:
    """Ask a run to stop after its current step (it saves last.pt first). Returns the STOP file."""
    stop = RunDir(run_dir).stop_file
    stop.touch()
    return stop


def pretrained_checkpoint(run_dir: str | os.PathLike, arch: str | None = None) -> Path:
    """The checkpoint a pre-training run offers to fine-tuning: checkpoints/last.pt of a run that ended "finished" or
    "stopped", i.e. its final weights (pre-training has no validation score to choose a best checkpoint by).

    A run that is still active or that failed is refused: its last.pt is only the last epoch it completed, so
    "fine-tuned from run X" would not name one set of weights. Resume it first, or give its checkpoints/last.pt file to
    start from that checkpoint anyway. With `arch`, the run's encoder must fine-tune with that architecture
    (ENCODER_ARCH).

    Raises:
        BadInputError: not a pre-training run, an encoder for another architecture, a run that is active or failed,
            or no checkpoint.
    """
    run = RunDir(Path(run_dir).absolute())
    config = read_json(run.config) or {}
    if config.get("command") != "pretrain":
        what = ("a fine-tuning run" if config.get("command") == "finetune" else
                "not a mim3d run (no readable config.json)")
        raise BadInputError(f"{run.path}: {what}; choose the folder of a pre-training run, or a checkpoint file")
    method = config.get("model", {}).get("method")
    if arch is not None and ENCODER_ARCH.get(method, arch) != arch:
        raise BadInputError(f"{run.path}: a {method} pre-training run; its encoder fine-tunes with --arch "
                            f"{ENCODER_ARCH[method]}, not --arch {arch}")
    if not run.checkpoint("last").is_file():
        raise BadInputError(f"{run.path}: the run has no checkpoints/last.pt yet (it has not finished an epoch)")
    state = read_status(run.path)["state"]
    if state not in ("finished", "stopped"):
        what = "never started (no status.json)" if state == "missing" else f"is {state}"
        raise BadInputError(f"{run.path}: the pre-training run {what}; use it once it has finished or been stopped"
                            f"{' (resume it first)' if state == 'failed' else ''}, or give its checkpoints/last.pt "
                            "file to start from that checkpoint anyway")
    return run.checkpoint("last")


def list_runs(parent_dir: str | os.PathLike) -> list[dict]:
    """The runs directly inside `parent_dir`, newest update first: their `read_status` plus "run_dir"."""
    parent = Path(parent_dir)
    if not parent.is_dir():
        return []
    runs = [{**read_status(child), "run_dir": str(child)}
            for child in parent.iterdir() if child.is_dir() and RunDir(child).holds_run()]
    return sorted(runs, key=lambda status: str(status.get("updated", "")), reverse=True)


__all__ = ["STATES", "ACTIVE_STATES", "RunDir", "now_iso", "write_json_atomic", "read_json", "read_status",
           "is_alive", "read_metrics", "request_stop", "pretrained_checkpoint", "list_runs"]
