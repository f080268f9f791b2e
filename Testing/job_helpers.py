"""What the runner and panel tests share: a scheduler the test drives, a recorder of a job's callbacks, and a tiny
model package so that a real `mim3d segment` run takes seconds.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from segment_helpers import model_info

from MiMSegmentationLib.worker import JobOutcome, WorkerJob, worker_command, worker_env

# A real mim-unetr at a fraction of the "small" preset: 6 channels in the first stage, one block per stage.
TINY = {"embed_dims": (6, 12, 24, 48), "depths": (1, 1, 1, 1), "num_heads": 2}
TINY_ROI = (64, 32, 32)  # one edge of 64: the network accepts no smaller window
# One torch thread per worker: on a shared 2-core machine, more threads spin against each other (3-4× slower).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def save_tiny_package(folder: Path, spacing_mm: float) -> Path:
    """A tiny model package predicting at ``spacing_mm``: on example_ct_sm, 5 mm gives 6 windows, 8 mm gives 2."""
    import torch

    from mim3d.models import build_segmenter
    from mim3d.package import save_package
    from mim3d.presets import config_to_dict, resolve

    torch.manual_seed(0)
    model = build_segmenter("mim-unetr", 3, preset="small", roi_size=TINY_ROI, **TINY)
    info = model_info(spacing_mm=(spacing_mm,) * 3, roi_size=TINY_ROI, overlap=0.5)
    info = dataclasses.replace(info, architecture={**info.architecture,
                                                   "config": config_to_dict(resolve("mim-unetr", "small", **TINY))})
    save_package(folder, model, info)
    return folder


def python_command(code: str, *args: str) -> list[str]:
    """A worker stand-in: ``python -c code args``."""
    return [sys.executable, "-c", code, *args]


def segment_command(ct: Path, model: Path, output: Path) -> list[str]:
    return worker_command("segment", [str(ct), "--model", str(model), "--output", str(output), "--device", "cpu"],
                          python=sys.executable)


class ManualScheduler:
    """``schedule(ms, fn)`` for a WorkerJob; the test runs what is due with ``run_until``, on its own thread."""

    def __init__(self):
        self.pending: list[tuple[float, Callable[[], None]]] = []

    def __call__(self, ms: int, fn: Callable[[], None]) -> None:
        self.pending.append((time.monotonic() + ms / 1000, fn))

    def run_until(self, done: Callable[[], bool], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"not done after {timeout_s} s")
            now = time.monotonic()
            due = [item for item in self.pending if item[0] <= now]
            self.pending = [item for item in self.pending if item[0] > now]
            for _, fn in due:
                fn()
            time.sleep(0.005)


class Recorder:
    """A job's callbacks as lists, and the threads they ran on; cancels the job at the first event for which
    ``cancel_when(event)`` is true, as a user clicking Cancel would, from the callback."""

    def __init__(self, cancel_when: Callable[[dict], bool] = lambda event: False):
        self.events: list[dict] = []
        self.logs: list[str] = []
        self.outcomes: list[JobOutcome] = []
        self.threads: set[int] = set()
        self.cancel_when = cancel_when
        self.cancelled_at: dict | None = None
        self.job: WorkerJob | None = None

    def on_event(self, event: dict) -> None:
        self.threads.add(threading.get_ident())
        self.events.append(event)
        if self.cancelled_at is None and self.cancel_when(event):
            self.cancelled_at = event
            self.job.cancel()

    def on_log(self, line: str) -> None:
        self.threads.add(threading.get_ident())
        self.logs.append(line)

    def on_finished(self, outcome: JobOutcome) -> None:
        self.threads.add(threading.get_ident())
        self.outcomes.append(outcome)


def run_job(args: Sequence[str], recorder: Recorder, scheduler: ManualScheduler | None = None, *,
            timeout_s: float = 60.0, **options) -> WorkerJob:
    """Start a WorkerJob on ``args`` (environment: ``worker_env(ONE_THREAD)``) with ``recorder``'s callbacks and drive
    it with ``scheduler`` until it ends."""
    scheduler = scheduler or ManualScheduler()
    job = recorder.job = WorkerJob(args, worker_env(ONE_THREAD), schedule=scheduler, on_event=recorder.on_event,
                                   on_log=recorder.on_log, on_finished=recorder.on_finished, poll_ms=20, **options)
    job.start()
    scheduler.run_until(lambda: bool(recorder.outcomes), timeout_s)
    return job
