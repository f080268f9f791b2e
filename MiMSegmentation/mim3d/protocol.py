"""The worker protocol: one JSON object per line on stdout, shared by the worker, Slicer and scripts. Stdlib only.

Events:
    {"type": "progress", "stage": "inference", "fraction": 0.42, "message": "window 12/40"}
    {"type": "metric", "step": 120, "epoch": 3, "values": {"loss": 0.71}}
    {"type": "result", ...anything the command returns...}
    {"type": "error", "kind": "bad_input" | "internal" | "cancelled", "message": "..."}
Exit codes: 0 success, 1 internal error, 2 bad input, 130 cancelled (SIGTERM/SIGINT ended the command early with no
output). A training run that is stopped (SIGTERM or a STOP file) saves a checkpoint and exits 0 with a result event
whose "state" is "stopped": stopping is a normal end of a run that can be resumed.
Human-readable logs go to stderr; stdout carries only these lines.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 1, 2, 130
EVENT_TYPES = ("progress", "metric", "result", "error")


class Emitter:
    """Writes protocol events to a stream (stdout by default), one flushed line each."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout

    def _emit(self, event: dict[str, Any]) -> None:
        self.stream.write(json.dumps(event, allow_nan=False, default=str) + "\n")
        self.stream.flush()

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        self._emit({"type": "progress", "stage": stage, "fraction": round(min(max(fraction, 0.0), 1.0), 4),
                    "message": message})

    def metric(self, step: int, epoch: int, values: dict[str, float]) -> None:
        self._emit({"type": "metric", "step": step, "epoch": epoch, "values": values})

    def result(self, **fields: Any) -> None:
        self._emit({"type": "result", **fields})

    def error(self, kind: str, message: str) -> None:
        self._emit({"type": "error", "kind": kind, "message": message})


def parse_line(line: str) -> dict[str, Any] | None:
    """The event on a worker stdout line, or None for a line that is not a protocol event."""
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and event.get("type") in EVENT_TYPES else None
