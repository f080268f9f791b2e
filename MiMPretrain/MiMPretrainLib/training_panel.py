"""The training panel's state machine: what the MiMPretrain Widget shows and allows, with no Qt. Standard library only.

    idle ──started()──▶ starting ──▶ running ──▶ finished
                            │           │  ╲───▶ failed
                            │   stop_requested()
                            ▼           ▼
                          stopping ──▶ stopped ──started() (Resume)──▶ starting ...

The Widget calls `started(run_dir)` right after `start_run` / `resume_run`, feeds every `RunWatcher.refresh()`
snapshot to `update`, calls `stop_requested()` with `stop_run`, and renders `view()` (the run: status and run
controls) and, for each form, `start_view(problems)` (its Start button; problems: the form's `check()`). The run's
status never depends on a form. A snapshot re-attached after a Slicer restart puts the panel straight into the run's
state. A Stop click shows "stopping" at once, although the run's status still says "running" until its step ends.

Also here, for the forms: `path_text` (a path field's text and setting), `estimate` (the time estimate on the
device the run will use), and `LatestCheck`, the worker checks that follow a form (the scan preview, the memory plan)
with `memory_estimate`, the plan's line.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from MiMSegmentationLib.worker import JobOutcome, WorkerJob, launch, worker_command

from .training_runs import RunSnapshot
from .training_settings import FinetuneSettings, PretrainSettings, estimate_time, plan_args, summarize_plan

DEBOUNCE_MS = 700  # a check starts once the form has been left alone this long (typing a number, ticking through)


class TrainingState(enum.StrEnum):
    IDLE = "idle"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FINISHED = "finished"
    FAILED = "failed"


ACTIVE = (TrainingState.STARTING, TrainingState.RUNNING, TrainingState.STOPPING)
_FROM_RUN = {"starting": TrainingState.STARTING, "running": TrainingState.RUNNING,
             "stopping": TrainingState.STOPPING, "stopped": TrainingState.STOPPED,
             "finished": TrainingState.FINISHED, "failed": TrainingState.FAILED}


@dataclass(frozen=True)
class TrainingView:
    """What the Widget renders of the run it follows (the forms' Start buttons: `StartView`).

    Attributes:
        state: the panel's state.
        stop_enabled: a run is starting or running (not once a stop was asked for).
        resume_enabled: the run stopped or failed, has a last checkpoint, and its process has ended.
        use_enabled: "Use for segmentation": a finished fine-tuning run with a model package, not registered yet.
        settings_enabled: the settings can be edited (no active run).
        progress: 0..100, the run's steps done.
        status: one line, e.g. "epoch 3/10 · step 120/400 · ETA 12 min".
        error: the message of a failed run, else "".
        run_dir: the run the panel follows ("" before one).
    """

    state: TrainingState
    stop_enabled: bool
    resume_enabled: bool
    use_enabled: bool
    settings_enabled: bool
    progress: int
    status: str
    error: str
    run_dir: str


@dataclass(frozen=True)
class StartView:
    """A form's Start button and the line under the form.

    Attributes:
        enabled: the form has no problems and no run is active.
        tooltip: why Start is disabled (the form's problems, one a line, or the active run), "" when it is enabled.
        hint: the form's first problem ("" when none), shown in place of the time estimate.
    """

    enabled: bool
    tooltip: str
    hint: str


class TrainingPanel:
    """The panel's state (module docstring)."""

    def __init__(self):
        self.state = TrainingState.IDLE
        self.run_dir = ""
        self.snapshot: RunSnapshot | None = None
        self.registered_as = ""

    # ---- transitions (the Widget calls these) ---------------------------------------------------------------------

    def started(self, run_dir: str) -> None:
        """A run was launched or resumed in `run_dir`. Raises RuntimeError while another one is active."""
        if self.state in ACTIVE:
            raise RuntimeError(f"cannot start a run while one is {self.state.value}")
        if str(run_dir) != self.run_dir:
            self.snapshot, self.registered_as = None, ""
        self.state, self.run_dir = TrainingState.STARTING, str(run_dir)

    def update(self, snapshot: RunSnapshot) -> TrainingState:
        """A fresh look at the run (RunWatcher.refresh); the new state. A stop asked for stays "stopping" until the
        run has ended; a run not written yet ("missing") keeps a starting panel starting."""
        self.snapshot, self.run_dir = snapshot, snapshot.run_dir
        new = _FROM_RUN.get(snapshot.state)
        if new is None:
            self.state = TrainingState.STARTING if self.state is TrainingState.STARTING else TrainingState.IDLE
        elif self.state is TrainingState.STOPPING and new in (TrainingState.STARTING, TrainingState.RUNNING):
            pass
        else:
            self.state = new
        return self.state

    def stop_requested(self) -> None:
        """The user clicked Stop (the Widget also calls `stop_run`)."""
        if self.state in (TrainingState.STARTING, TrainingState.RUNNING):
            self.state = TrainingState.STOPPING

    def model_registered(self, model_id: str) -> None:
        """The run's model was installed in the registry as `model_id` (register_model)."""
        self.registered_as = model_id

    # ---- what the Widget shows ------------------------------------------------------------------------------------

    def view(self) -> TrainingView:
        """The run as it stands now."""
        s = self.snapshot
        resumable = (self.state in (TrainingState.STOPPED, TrainingState.FAILED) and s is not None
                     and s.last_checkpoint is not None and not s.alive)
        usable = (self.state is TrainingState.FINISHED and s is not None and s.command == "finetune"
                  and s.model_package is not None and not self.registered_as)
        progress = 100 if self.state is TrainingState.FINISHED else round(100 * s.fraction) if s else 0
        return TrainingView(
            state=self.state, stop_enabled=self.state in (TrainingState.STARTING, TrainingState.RUNNING),
            resume_enabled=resumable, use_enabled=usable, settings_enabled=self.state not in ACTIVE,
            progress=progress, status=self._status(),
            error=s.message if self.state is TrainingState.FAILED and s is not None else "", run_dir=self.run_dir)

    def start_view(self, problems: list[str]) -> StartView:
        """A form's Start button, given the form's problems (its settings' `check()`)."""
        active = self.state in ACTIVE
        tooltip = f"A run is {self.state.value}." if active else "\n".join(problems)
        return StartView(enabled=not active and not problems, tooltip=tooltip, hint=problems[0] if problems else "")

    def _status(self) -> str:
        s = self.snapshot
        if self.state is TrainingState.IDLE:
            return "No run yet: start one, or choose one of the runs folder's runs."
        if self.state is TrainingState.STARTING:
            return f"starting: {s.message}" if s and s.message else "starting the worker"
        counters = _counters(s)
        if self.state is TrainingState.RUNNING:
            return counters + (f" · ETA {s.eta}" if s.eta else "")
        if self.state is TrainingState.STOPPING:
            return f"stopping after the current step · {counters}" if s else "stopping after the current step"
        if self.state is TrainingState.STOPPED and not counters:
            return s.message or "stopped"
        if self.state is TrainingState.STOPPED:
            return f"stopped · {counters}" + (" · Resume continues it" if s.last_checkpoint else "")
        if self.state is TrainingState.FAILED:
            return f"failed · {counters}" if s.total_steps else "failed before the run began"
        dice = f" · best mean Dice {s.best_mean_dice:.3f}" if s.best_mean_dice is not None else ""
        registered = f" · installed as model '{self.registered_as}'" if self.registered_as else ""
        return f"finished · {counters}{dice}{registered}"


def _counters(s: RunSnapshot | None) -> str:
    """"epoch 3/10 · step 120/400" ("" before the run has counted anything)."""
    if s is None or not s.total_steps:
        return ""
    return f"epoch {s.epoch}/{s.epochs} · step {s.step}/{s.total_steps}"


# ---- the forms ----------------------------------------------------------------------------------------------------

def path_text(value: object) -> str:
    """A path field's text, and the setting it stands for: stripped, "" when empty. "." counts as empty: it is what
    Slicer's Path serializer writes for an empty path (scenes saved by earlier versions hold it)."""
    text = str(value).strip()
    return "" if text == "." else text


def detected_device(result: dict | None) -> str | None:
    """The device an "auto" run trains on, from the result of `mim3d devices` ("cuda" or "cpu"); None when there is
    no answer (yet, or the check failed)."""
    return (result or {}).get("recommended")


def estimate(settings: PretrainSettings | FinetuneSettings, count: int | None, detected: str | None) -> str:
    """The time estimate of a run on `count` volumes or cases, on the device it will use: its device setting, or for
    "auto" the `detected` one; "" while `count` or (for "auto") the device is not known."""
    device = detected if settings.device == "auto" else settings.device
    if not count or device is None:
        return ""
    return estimate_time(settings, count, device)


# ---- worker checks that follow a form ----------------------------------------------------------------------------

class LatestCheck:
    """A short worker command re-run as a form changes (`mim3d pretrain --check-data`, `... --check-plan`).

    `request(command, args)` on every change (None: nothing to check). The same arguments again change nothing. New
    ones start a worker once no newer request came for `debounce_ms`; one process at a time: a running one is
    cancelled (its answer dropped), and the latest arguments start when it has ended. `on_finished(outcome)` gets
    only the outcome of the latest arguments, which `outcome` then holds (None while they are pending).

    Args:
        schedule: `schedule(ms, fn)` runs `fn` later on the GUI thread (`qt.QTimer.singleShot`); the jobs poll
            through it too.
        env, python: the workers' environment and interpreter (None: `worker_env()`, `default_python()`).
        launch: how a worker process starts (WorkerJob's `launch`).
    """

    def __init__(self, schedule: Callable[[int, Callable[[], None]], None],
                 on_finished: Callable[[JobOutcome], None], *, debounce_ms: int = DEBOUNCE_MS,
                 env: Mapping[str, str] | None = None, python: str | None = None,
                 launch: Callable[..., Any] = launch):
        self._schedule, self._on_finished, self.debounce_ms = schedule, on_finished, debounce_ms
        self._env, self._python, self._launch = env, python, launch
        self.wanted: list[str] | None = None  # the latest request's worker command line
        self.outcome: JobOutcome | None = None
        self._job: WorkerJob | None = None
        self._stale = False  # the running job's arguments are no longer wanted
        self._generation = 0  # requests so far: a debounce that sees a newer one does nothing
        self._due = False  # the latest request's debounce has passed

    @property
    def pending(self) -> bool:
        """Arguments are wanted and their outcome has not come yet."""
        return self.wanted is not None and self.outcome is None

    def request(self, command: str, args: Sequence[str] | None) -> None:
        wanted = None if args is None else worker_command(command, args, self._python)
        if wanted == self.wanted:
            return
        self.wanted, self.outcome, self._due = wanted, None, False
        self._generation += 1
        if self._job is not None:
            self._stale = True
            self._job.cancel()
        if wanted is not None:
            generation = self._generation
            self._schedule(self.debounce_ms, lambda: self._come_due(generation))

    def _come_due(self, generation: int) -> None:
        if generation == self._generation:
            self._due = True
            if self._job is None:  # else it starts when the cancelled job has ended
                self._start()

    def _start(self) -> None:
        job = WorkerJob(self.wanted, self._env, launch=self._launch, schedule=self._schedule,
                        on_finished=self._ended)
        job.start()  # OSError (no interpreter) reaches the caller, and the next request tries again
        self._job, self._stale = job, False

    def _ended(self, outcome: JobOutcome) -> None:
        self._job = None
        if not self._stale:
            self.outcome = outcome
            self._on_finished(outcome)
        elif self.wanted is not None and self._due:
            self._start()


def plan_request(settings: PretrainSettings | FinetuneSettings, problems: list[str], devices: dict | None
                 ) -> list[str] | None:
    """The `--check-plan` options of a form (training_settings.plan_args), or None while it has `problems` or the
    worker cannot plan yet: `mim3d devices` (its result: `devices`) has not answered, or found no torch (the worker's
    packages are not installed)."""
    if problems or (devices or {}).get("torch") is None:
        return None
    return plan_args(settings)


def memory_estimate(check: LatestCheck) -> str:
    """The memory line of the form `check` plans for (`--check-plan`): "" with nothing to plan, a waiting note, or
    the plan (training_settings.summarize_plan)."""
    if check.wanted is None:
        return ""
    if check.outcome is None:
        return "Memory: estimating..."
    return summarize_plan(check.outcome.result, check.outcome.error, check.outcome.message)
