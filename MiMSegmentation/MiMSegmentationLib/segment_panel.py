"""The Segment panel's state machine: what the Widget shows and allows, with no Qt. Standard library only.

    idle ──start()──▶ running ──finished(ok)──▶ importing ──import_done(n)──▶ done
                        │  ╲                        └──────import_failed(msg)──▶ failed
       cancel_requested()   ╲──finished(failure)──▶ failed
                        ▼
                    cancelling ──finished(any)──▶ cancelled

done, failed and cancelled behave as idle (a new ``start()`` is allowed) but keep their final message. The Widget
forwards the job's callbacks (``on_event``, ``finished``), imports the result itself while the state is importing,
and renders ``view(...)``, a frozen ``PanelView``, after every change and on a timer while busy (the clock moves).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .worker import JobOutcome


class PanelState(enum.StrEnum):
    IDLE = "idle"
    RUNNING = "running"
    CANCELLING = "cancelling"
    IMPORTING = "importing"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


BUSY = (PanelState.RUNNING, PanelState.CANCELLING, PanelState.IMPORTING)
# Share of the progress bar per stage of `mim3d segment` (module docstring of mim3d.inference.segment), then the
# import into the scene; the sliding windows are where the time goes.
STAGE_WEIGHTS = {"load": 5, "preprocess": 10, "windows": 65, "postprocess": 10, "write": 5, "import": 5}
_STAGE_START = {stage: sum(list(STAGE_WEIGHTS.values())[:n]) for n, stage in enumerate(STAGE_WEIGHTS)}


@dataclass(frozen=True)
class PanelView:
    """Everything the Widget renders.

    Attributes:
        state: the panel's state.
        apply_text: "Segment", "Cancel" (running) or "Cancelling…".
        apply_enabled: the apply button can be clicked (to start, or to cancel while running).
        apply_tooltip: why Segment cannot start ("" when it can, or while busy).
        inputs_enabled: the input, model and option widgets can be changed (not while busy).
        busy: running, cancelling or importing (show the progress bar, keep the job).
        progress: 0..100, never decreasing during a run.
        status: one line: the stage and its message with the elapsed time while busy; the final message after a
            run; otherwise why Segment cannot start, or "Ready."
        device: the compute device the worker will use, from ``devices_checked`` ("" until then).
    """

    state: PanelState
    apply_text: str
    apply_enabled: bool
    apply_tooltip: str
    inputs_enabled: bool
    busy: bool
    progress: int
    status: str
    device: str


class SegmentPanel:
    """The Segment panel's state (module docstring); ``clock`` gives seconds (default ``time.monotonic``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.state = PanelState.IDLE
        self.final_message = ""
        self.device = ""
        self._devices_seen_torch: bool | None = None  # None: no device check has finished yet
        self._device_check_running = False
        self._fast_suggested = False
        self._progress = 0.0
        self._stage_line = ""
        self._started_at = self._ended_at = 0.0
        self._result: dict[str, Any] | None = None

    # ---- what the Widget asks ------------------------------------------------------------------------------------

    def start_blocker(self, has_input: bool, has_model: bool, model_installed: bool = True) -> str:
        """Why Segment cannot start now, or "" when it can."""
        if self.state in BUSY:
            return "A segmentation is already running."
        if not has_input:
            return "Choose an input volume."
        if not has_model:
            return "Choose a model."
        if not model_installed:
            return "The chosen model is not installed: download or import it first."
        return ""

    def view(self, has_input: bool, has_model: bool, model_installed: bool = True) -> PanelView:
        """What to show now, given the Widget's current inputs."""
        blocker = self.start_blocker(has_input, has_model, model_installed)
        busy = self.state in BUSY
        if self.state is PanelState.RUNNING:
            apply_text, apply_enabled = "Cancel", True
        elif self.state is PanelState.CANCELLING:
            apply_text, apply_enabled = "Cancelling…", False
        else:
            apply_text, apply_enabled = "Segment", not blocker
        return PanelView(state=self.state, apply_text=apply_text, apply_enabled=apply_enabled,
                         apply_tooltip="" if busy else blocker, inputs_enabled=not busy, busy=busy,
                         progress=int(self._progress), status=self._status(blocker), device=self.device)

    @property
    def elapsed_s(self) -> float:
        """Seconds since ``start()``; fixed when the run ends; 0 before the first run."""
        if self.state is PanelState.IDLE:
            return 0.0
        return (self._clock() if self.state in BUSY else self._ended_at) - self._started_at

    # ---- transitions (the Widget calls these) ---------------------------------------------------------------------

    def start(self) -> None:
        """A run begins (call right after ``WorkerJob.start()``). Raises RuntimeError while one is busy."""
        if self.state in BUSY:
            raise RuntimeError(f"cannot start a segmentation while {self.state.value}")
        self.state, self.final_message, self._progress, self._result = PanelState.RUNNING, "", 0.0, None
        self._stage_line = "starting the worker"
        self._started_at = self._clock()

    def on_event(self, event: dict[str, Any]) -> None:
        """A protocol event from the worker: progress moves the bar and the status line while running; the rest is
        read from the outcome in ``finished``."""
        if self.state is not PanelState.RUNNING or event.get("type") != "progress":
            return
        stage, message = str(event.get("stage", "")), str(event.get("message", ""))
        self._stage_line = f"{stage}: {message}" if message else stage
        if stage in STAGE_WEIGHTS:
            fraction = min(max(float(event.get("fraction", 0.0)), 0.0), 1.0)
            self._progress = max(self._progress, _STAGE_START[stage] + STAGE_WEIGHTS[stage] * fraction)

    def cancel_requested(self) -> None:
        """The user clicked Cancel (the Widget also calls ``WorkerJob.cancel()``); only a running job can be."""
        if self.state is PanelState.RUNNING:
            self.state = PanelState.CANCELLING

    def finished(self, outcome: JobOutcome) -> PanelState:
        """The worker has ended; the new state. IMPORTING means: import ``outcome.result`` now, then call
        ``import_done`` or ``import_failed``. After a Cancel click the run ends cancelled, whatever the worker did."""
        if self.state not in (PanelState.RUNNING, PanelState.CANCELLING):
            return self.state
        if self.state is PanelState.CANCELLING or outcome.cancelled:
            self.final_message = f"Cancelled after {self._end(PanelState.CANCELLED)}."
        elif outcome.ok and outcome.result is not None:
            self.state, self._result = PanelState.IMPORTING, outcome.result
            self._progress, self._stage_line = float(_STAGE_START["import"]), "importing the segmentation"
        elif outcome.ok:
            self._end(PanelState.FAILED)
            self.final_message = "Failed: the worker finished without a result."
        else:
            self._end(PanelState.FAILED)
            self.final_message = f"Failed: {outcome.message}"
        return self.state

    def import_done(self, n_segments: int) -> None:
        """The segmentation is in the scene with ``n_segments`` segments."""
        if self.state is not PanelState.IMPORTING:
            return
        self._progress = 100.0
        segments = f"{n_segments} segment" + ("" if n_segments == 1 else "s")
        self.final_message = f"Done: {segments} in {self._end(PanelState.DONE)}.{_warnings(self._result)}"

    def import_failed(self, message: str) -> None:
        """Reading the worker's output into the scene failed; ``message`` says why."""
        if self.state is PanelState.IMPORTING:
            self._end(PanelState.FAILED)
            self.final_message = f"Failed to import the segmentation: {message}"

    def needs_device_check(self, torch_installed: bool) -> bool:
        """Whether to run ``mim3d devices`` (again) now: no check has finished or is running yet, or the last one ran
        without PyTorch (or failed) and PyTorch is installed now. Devices are first checked when the module is set up,
        often before PyTorch is installed; a GPU must not stay unseen (and fast mode on) until Slicer restarts."""
        if self._device_check_running:
            return False
        return self._devices_seen_torch is None or (torch_installed and not self._devices_seen_torch)

    def device_check_started(self) -> None:
        self._device_check_running = True

    def devices_checked(self, outcome: JobOutcome) -> bool | None:
        """The outcome of a ``mim3d devices`` job: sets ``device`` (the line the panel shows). Returns the fast mode
        to set: True when the worker will run on the CPU (suggested; the user can untick it), False when a GPU is
        found after fast mode was suggested for the CPU, None to leave it as it is."""
        self._device_check_running = False
        self.device = _device_line(outcome)
        result = outcome.result if outcome.ok and outcome.result is not None else {}
        self._devices_seen_torch = result.get("torch") is not None
        recommended = result.get("recommended")
        fast = True if recommended == "cpu" else (False if recommended == "cuda" and self._fast_suggested else None)
        if fast is not None:
            self._fast_suggested = fast
        return fast

    # ---- helpers ------------------------------------------------------------------------------------------------

    def _end(self, state: PanelState) -> str:
        """Enter a final state and stop the clock; the run's time as mm:ss."""
        self.state, self._ended_at = state, self._clock()
        return format_elapsed(self.elapsed_s)

    def _status(self, blocker: str) -> str:
        if self.state in BUSY:
            line = "cancelling" if self.state is PanelState.CANCELLING else self._stage_line
            return f"{line} ({format_elapsed(self.elapsed_s)})"
        return self.final_message or blocker or "Ready."


def format_elapsed(seconds: float) -> str:
    """mm:ss, or h:mm:ss from one hour on."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def _warnings(result: dict[str, Any] | None) -> str:
    """The result's warnings without the input path the worker puts first (the GUI's temporary file)."""
    if not result or not result.get("warnings"):
        return ""
    inputs = [str(case.get("input", "")) + ": " for case in result.get("cases", [])]
    texts = [next((w.removeprefix(p) for p in inputs if w.startswith(p)), w) for w in map(str, result["warnings"])]
    return " Warning: " + "; ".join(texts)


def _device_line(outcome: JobOutcome) -> str:
    if not outcome.ok or outcome.result is None:
        return f"Device check failed: {outcome.message}"
    result = outcome.result
    if result.get("torch") is None:
        return "PyTorch is not installed."
    if result.get("recommended") == "cuda" and result.get("cuda"):
        gpu = result["cuda"][0]
        return f"GPU: {gpu['name']}, {gpu['free_mb'] / 1024:.1f} of {gpu['total_mb'] / 1024:.1f} GB free"
    bf16 = ", bf16" if result.get("cpu_bf16") else ""
    return f"CPU, {result.get('cpu_threads', '?')} threads{bf16} (no CUDA GPU found)"
