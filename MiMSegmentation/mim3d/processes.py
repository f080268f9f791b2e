"""Process control for workers and training runs: is it alive, is it still the process we started, stop its tree.

The one home of these questions for the Slicer panels (worker jobs, detached training runs) and for `mim3d.runs`.
It uses `psutil` (a dependency of mim3d, and installed into Slicer's Python with the worker's packages). Slicer does
not bundle psutil (checked against Slicer 5.10.0 and main), so before that first install this module falls back to
the operating system's own calls: signal 0 and /proc on POSIX; OpenProcess/GetExitCodeProcess and ``taskkill /T``
on Windows. The fallback answers liveness and stops trees, but cannot tell a reused pid (no create time); a
descendant that left the process group is reached only through psutil. Standard library at import time.

    tree = ProcessTree(pid)     # the process and its descendants as they are now
    if not tree.terminate():    # SIGTERM (POSIX), CTRL_BREAK_EVENT to the group (Windows, shared console only)
        tree.kill()             # nothing could be asked: end the tree at once
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

# A process created more than this after a moment it was recorded at is another process that got the same pid.
# Covers the whole-second boot time behind Linux create times and clock adjustments.
CLOCK_SLACK_S = 2.0


def _psutil():
    """psutil, or None while it is not installed (Slicer before the worker's packages are installed). Not cached when
    missing, so an install during the session is picked up."""
    try:
        import psutil
    except ImportError:
        return None
    return psutil


def is_running(pid: int, created_by: float | None = None) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped, does not) and, when ``created_by`` (epoch
    seconds) is given and psutil can tell, was created no later than that: a pid that a later process reused is not
    the process recorded at ``created_by``. A process of another user counts as running."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    psutil = _psutil()
    if psutil is None:
        return _os_is_running(pid)
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return created_by is None or process.create_time() <= created_by + CLOCK_SLACK_S
    except psutil.NoSuchProcess:  # ZombieProcess (macOS) is one too
        return False
    except psutil.AccessDenied:
        return True


def _os_is_running(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would be TerminateProcess there, not a probe
        return _windows_is_running(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """A killed child that its parent has not reaped yet still answers kill(pid, 0); /proc tells (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].startswith("Z")


def _windows_is_running(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    query_limited_information, still_active, access_denied = 0x1000, 259, 5
    handle = kernel32.OpenProcess(query_limited_information, False, pid)
    if not handle:
        return ctypes.get_last_error() == access_denied
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == still_active
    finally:
        kernel32.CloseHandle(handle)


class ProcessTree:
    """Process ``pid`` and its descendants. Launchers start the worker as a child (PythonSlicer runs Python as its
    child), so a stop must reach the whole tree: the descendants are listed now and again at each step while the root
    lives, so that those orphaned when the root exits are still reached. ``created_by``: see ``is_running``; a root
    that is not that process makes an empty tree.

    POSIX: the signals go to the root's process group (``launch`` and ``start_run`` give each worker its own) and to
    every descendant outside it. Windows: the polite stop is CTRL_BREAK_EVENT to the group, which arrives only when it
    shares a console with the caller (Slicer has none); the kill is TerminateProcess of each process (psutil) or
    ``taskkill /T /F``.
    """

    def __init__(self, pid: int, created_by: float | None = None):
        self.pid = pid
        self._members: dict[int, object] = {}  # pid -> psutil.Process, which refuses to signal a reused pid
        self._valid = is_running(pid, created_by)
        self._collect()

    def _collect(self) -> None:
        psutil = _psutil()
        if psutil is None or not self._valid:
            return
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.pid)
            for process in (root, *root.children(recursive=True)):
                self._members.setdefault(process.pid, process)

    def _outside_group(self) -> list:
        """The members that a signal to the root's group does not reach (POSIX)."""
        psutil = _psutil()
        outside = []
        for process in self._members.values():
            with contextlib.suppress(psutil.Error, OSError):
                if process.pid != self.pid and os.getpgid(process.pid) != self.pid:
                    outside.append(process)
        return outside

    def terminate(self) -> bool:
        """Ask the tree to stop (mim3d workers clean up and exit 130). False when the request could not be delivered
        (the root is gone, or Windows without a shared console): waiting for it is pointless, ``kill()`` instead."""
        if not self._valid:
            return False
        self._collect()
        try:
            if os.name == "nt":
                os.kill(self.pid, signal.CTRL_BREAK_EVENT)
            else:
                os.killpg(self.pid, signal.SIGTERM)  # the group id of a worker we launched is its pid
        except OSError:
            return False
        if os.name != "nt":
            for process in self._outside_group():
                with contextlib.suppress(Exception):
                    process.terminate()
        return True

    def kill(self) -> None:
        """End every process of the tree now (also those the root left behind when it exited)."""
        if not self._valid:
            return
        self._collect()
        if os.name != "nt":
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        elif not self._members and _os_is_running(self.pid):  # no psutil: Windows' own tree kill
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(self.pid)], capture_output=True, check=False)
        for process in self._members.values():
            with contextlib.suppress(Exception):
                process.kill()

