"""Writing a run folder (layout and schemas: mim3d.runs) and stopping a run cleanly.

`RunWriter` is what the outside world sees of a run: status.json, metrics.jsonl, TensorBoard scalars, log.txt,
checkpoints, protocol events on stdout and a tqdm bar on a terminal. Only rank 0 writes; on the other ranks every
method returns at once (the checkpoint payload is still gathered there, see engine.save).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from ..protocol import Emitter
from ..runs import RunDir, now_iso, write_json_atomic

STATUS_INTERVAL_S = 1.0  # status.json is rewritten at most this often while running, and at every state change

log = logging.getLogger("mim3d.training")


class StopController:
    """A stop request: SIGTERM or SIGINT (a second SIGINT interrupts at once), or the run's STOP file.

    The training loop asks `requested()` between steps; the request is then shared by all ranks (engine), so every
    process finishes the same step, the checkpoint is saved, and the run ends with state "stopped".
    """

    def __init__(self, stop_file: Path | None):
        self.stop_file = stop_file
        self.reason: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.reason is not None:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C really interrupts
        self.reason = self.reason or f"{signal.Signals(signum).name} received"

    def requested(self) -> bool:
        if self.reason is None and self.stop_file is not None and self.stop_file.exists():
            self.reason = f"{self.stop_file.name} file found"
        return self.reason is not None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class RunWriter:
    """Status, metrics, TensorBoard, log file and checkpoints of one run (rank 0 only; inert elsewhere)."""

    def __init__(self, run: RunDir, *, active: bool, emitter: Emitter, command: str, epochs: int,
                 steps_per_epoch: int, total_steps: int, log_every: int):
        self.run, self.active, self.emitter = run, active, emitter
        self.epochs, self.steps_per_epoch, self.total_steps, self.log_every = (
            epochs, steps_per_epoch, total_steps, log_every)
        self.status = {"state": "starting", "pid": os.getpid(), "host": socket.gethostname(), "command": command,
                       "epoch": 0, "epochs": epochs, "step": 0, "total_steps": total_steps, "eta_seconds": None,
                       "steps_per_second": None, "loss": None, "last_checkpoint": None, "message": ""}
        self._tensorboard = self._log_handler = self._bar = self._log_redirect = None
        self._first_step: tuple[int, float] | None = None  # (step, time) when this process finished its first step
        self._last_status = self._last_log = 0.0
        self._logged_step = 0

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    def open(self, step: int, preamble: str = "") -> None:
        """Start writing at optimiser step `step` (0, or the resumed checkpoint's): metrics and TensorBoard events
        logged after that step by an earlier process are dropped, so the curves continue without duplicates.
        `preamble` goes to log.txt only (it has been shown on stderr already)."""
        if not self.active:
            return
        for folder in (self.run.checkpoints, self.run.tensorboard):
            folder.mkdir(parents=True, exist_ok=True)
        self.run.stop_file.unlink(missing_ok=True)  # a stale request must not stop the new process at once
        with open(self.run.log, "a", encoding="utf-8") as f:
            f.write(preamble)
        self._log_handler = logging.FileHandler(self.run.log, encoding="utf-8")
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(self._log_handler)
        _truncate_metrics(self.run.metrics, step)
        from torch.utils.tensorboard import SummaryWriter  # lazily: tensorboard is slow to import

        self._tensorboard = SummaryWriter(str(self.run.tensorboard), purge_step=step + 1 if step else None)
        if sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=self.total_steps, initial=step, file=sys.stderr, unit="step", dynamic_ncols=True)
            self._log_redirect = logging_redirect_tqdm()  # log lines print above the bar instead of through it
            self._log_redirect.__enter__()
        self.status["step"] = step
        self._logged_step, self._last_log = step, time.monotonic()

    def close(self) -> None:
        if self._bar is not None:
            self._log_redirect.__exit__(None, None, None)
            self._bar.close()
            self._bar = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    def set_state(self, state: str, message: str = "", **fields) -> None:
        """Record a state change now (status.json, and the log for the states a person should notice)."""
        self.status.update(state=state, message=message, **fields)
        if not self.active:
            return
        if state in ("running", "stopping", "failed"):
            log.info("run %s: %s%s", self.run.path, state, f" ({message})" if message else "")
        self._write_status()

    def _write_status(self) -> None:
        if self.run.path.is_dir():
            write_json_atomic(self.run.status, {**self.status, "updated": now_iso()})
            self._last_status = time.monotonic()

    # ---- per step and per epoch ---------------------------------------------------------------------------------

    def step(self, step: int, lr: float, values: dict[str, float], samples: int) -> None:
        """After optimiser step `step` (1-based count of steps done): values are the step's means over all ranks."""
        if not self.active:
            return
        now = time.monotonic()
        if self._first_step is None:
            self._first_step = (step, now)
        epoch = (step - 1) // self.steps_per_epoch
        self._update_timing(step, now, values["loss"], epoch)
        if step % self.log_every == 0 or step == self._first_step[0] or step == self.total_steps:
            self._log_step(step, lr, values, samples, now)
        message = f"epoch {epoch + 1}/{self.epochs} step {step}/{self.total_steps} loss {values['loss']:.4f}"
        self.emitter.progress(self.status["command"], step / max(self.total_steps, 1), message)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(epoch=f"{epoch + 1}/{self.epochs}", loss=f"{values['loss']:.4f}")
        if now - self._last_status >= STATUS_INTERVAL_S or step == self.total_steps:
            self._write_status()

    def _update_timing(self, step: int, now: float, loss: float, epoch: int) -> None:
        first_step, first_time = self._first_step
        rate = (step - first_step) / (now - first_time) if step > first_step and now > first_time else None
        eta = (self.total_steps - step) / rate if rate else None
        self.status.update(step=step, epoch=epoch, loss=loss, steps_per_second=rate and round(rate, 4),
                           eta_seconds=eta and round(eta, 1))

    def _log_step(self, step: int, lr: float, values: dict[str, float], samples: int, now: float) -> None:
        rate = samples * (step - self._logged_step) / max(now - self._last_log, 1e-9)
        self._last_log, self._logged_step = now, step
        entry = {"kind": "train", "step": step, "epoch": round(step / self.steps_per_epoch, 4), "lr": lr, **values,
                 "samples_per_second": round(rate, 4), "time": now_iso()}
        self._append_metrics(entry)
        self.emitter.metric(step, (step - 1) // self.steps_per_epoch, {"lr": lr, **values})
        for name, value in {"lr": lr, **values}.items():
            self._tensorboard.add_scalar(f"train/{name}", value, step)
        log.info("step %d/%d lr %.3g %s", step, self.total_steps, lr,
                 " ".join(f"{k} {v:.4f}" for k, v in values.items()))

    def epoch_end(self, epoch: int, step: int, means: dict[str, float]) -> None:
        if not self.active:
            return
        self._append_metrics({"kind": "epoch", "step": step, "epoch": epoch, **means})
        for name, value in means.items():
            self._tensorboard.add_scalar(f"epoch/{name}", value, step)
        self._tensorboard.flush()
        log.info("epoch %d/%d done: %s", epoch + 1, self.epochs, " ".join(f"{k} {v:.4f}" for k, v in means.items()))

    def _append_metrics(self, entry: dict) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in entry.items()}
        with open(self.run.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")

    def end(self, state: str, step: int, stop_reason: str | None, plan: dict) -> str:
        """Record the run's final state ("finished" or "stopped") with its message and close the writer; the message.
        ``plan`` has "total_steps" (this run's, --max-steps included) and "scheduled_steps"."""
        if state == "stopped":
            message = f"stopped at step {step} ({stop_reason}); continue with --resume"
        elif plan["total_steps"] < plan["scheduled_steps"]:
            message = f"reached --max-steps {plan['total_steps']} of the {plan['scheduled_steps']} scheduled steps"
        else:
            message = f"all {plan['scheduled_steps']} steps done"
        self.set_state(state, message, eta_seconds=0.0 if state == "finished" else None)
        self.close()
        return message

    def checkpoint_written(self, path: Path) -> None:
        self.status["last_checkpoint"] = path.relative_to(self.run.path).as_posix()
        self._write_status()
        log.info("checkpoint %s", path)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the metrics of steps <= `step` (all of them for a new run, which has none)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").split("\n")[:-1]
            if _step_of(line) is not None and _step_of(line) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
