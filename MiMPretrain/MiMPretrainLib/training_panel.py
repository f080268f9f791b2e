"""The training panel's state machine: what the MiMPretrain Widget shows and allows, with no Qt. Standard library only.

    idle ──started()──▶ starting ──▶ running ──▶ finished
                            │           │  ╲───▶ failed
                            │   stop_requested()
                            ▼           ▼
                          stopping ──▶ stopped ──started() (Resume)──▶ starting ...

The Widget calls `started(run_dir)` right after `start_run` / `resume_run`, feeds every `RunWatcher.refresh()`
snapshot to `update`, calls `stop_requested()` with `stop_run`, and renders `view(problems)` (problems: the settings'
`check()`). A snapshot re-attached after a Slicer restart puts the panel straight into the run's state. A Stop click
shows "stopping" at once, although the run's status still says "running" until its step ends.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .training_runs import RunSnapshot


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
    """Everything the Widget renders.

    Attributes:
        state: the panel's state.
        start_enabled: the settings are valid and no run is active.
        start_tooltip: why Start is disabled (the settings' problems, one a line), "" when it is enabled.
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
    start_enabled: bool
    start_tooltip: str
    stop_enabled: bool
    resume_enabled: bool
    use_enabled: bool
    settings_enabled: bool
    progress: int
    status: str
    error: str
    run_dir: str


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

    def view(self, problems: list[str]) -> TrainingView:
        """What to show now, given the current settings' problems (`check()`)."""
        active = self.state in ACTIVE
        s = self.snapshot
        tooltip = f"A run is {self.state.value}." if active else "\n".join(problems)
        resumable = (self.state in (TrainingState.STOPPED, TrainingState.FAILED) and s is not None
                     and s.last_checkpoint is not None and not s.alive)
        usable = (self.state is TrainingState.FINISHED and s is not None and s.command == "finetune"
                  and s.model_package is not None and not self.registered_as)
        progress = 100 if self.state is TrainingState.FINISHED else round(100 * s.fraction) if s else 0
        return TrainingView(
            state=self.state, start_enabled=not active and not problems, start_tooltip=tooltip,
            stop_enabled=self.state in (TrainingState.STARTING, TrainingState.RUNNING), resume_enabled=resumable,
            use_enabled=usable, settings_enabled=not active, progress=progress, status=self._status(problems),
            error=s.message if self.state is TrainingState.FAILED and s is not None else "", run_dir=self.run_dir)

    def _status(self, problems: list[str]) -> str:
        s = self.snapshot
        if self.state is TrainingState.IDLE:
            return problems[0] if problems else "Ready to start."
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
