"""mim3d.processes through the code that uses it: the worker runner's tree stop (Cancel, stop_process_tree), the
training panel's Stop (training_runs.stop_run), and liveness with pid reuse (mim3d.runs, the launch record). Real
processes: a worker whose child leaves the process group (as a launcher's child is out of reach of a group signal on
Windows), a PythonSlicer-like launcher that runs Python as its child, and the fallback without psutil.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from job_helpers import python_command

from mim3d import runs
from mim3d.processes import ProcessTree, is_running
from mim3d.runs import RunDir, read_status, write_json_atomic
from MiMPretrainLib import training_runs
from MiMSegmentationLib.worker import WorkerJob, launch, stop_process_tree

REPO = Path(__file__).resolve().parents[1]
posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX sessions and shebang launchers")
# A worker whose child starts a session of its own, so that no signal to the worker's process group reaches it.
ESCAPING_CHILD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(120)
"""


def _ended_soon(pid: int, timeout_s: float = 10.0) -> bool:
    """The process has ended (or is a zombie waiting for its new parent to reap it) within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while is_running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not is_running(pid)


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen(python_command("import time; time.sleep(60)"))


@posix_only
def test_stop_process_tree_ends_a_child_that_left_the_workers_group():
    with launch(python_command(ESCAPING_CHILD)) as worker:
        child = int(worker.stdout.readline())
        try:
            stop_process_tree(worker, grace_s=5)
            assert worker.returncode == -signal.SIGTERM
            assert _ended_soon(child), "the worker's child outlived the stop"
        finally:
            ProcessTree(child).kill()


@posix_only
def test_cancel_ends_a_child_that_left_the_workers_group():
    lines = []  # the child's pid arrives as a log line (it is not a protocol event)
    job = WorkerJob(python_command(ESCAPING_CHILD), on_log=lines.append, cancel_grace_s=5)
    job.start()
    deadline = time.monotonic() + 30
    while not lines and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    child = int(lines[0])
    try:
        job.cancel()
        outcome = job.wait(30)
        assert (outcome.cancelled, outcome.returncode) == (True, -signal.SIGTERM)
        assert _ended_soon(child), "the worker's child outlived Cancel"
    finally:
        ProcessTree(child).kill()


def _launcher(folder: Path) -> Path:
    """A stand-in for PythonSlicer: it runs Python as its child (here in a session of its own, as on Windows, where a
    signal to the launcher does not reach its child), writes the child's pid, and waits for it."""
    script = folder / "PythonSlicer"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(f"""
        import subprocess, sys
        from pathlib import Path
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
        Path({str(folder / "child.pid")!r}).write_text(str(child.pid))
        sys.exit(child.wait())
        """), encoding="utf-8")
    script.chmod(0o755)
    return script


@posix_only
def test_stop_before_the_run_began_ends_the_launchers_child(tmp_path):
    run_dir = tmp_path / "runs" / "pretrain-1"
    launcher = _launcher(tmp_path)
    launcher_pid = training_runs.start_run("pretrain", ["--out", str(run_dir)], run_dir, python=str(launcher))
    deadline = time.monotonic() + 30
    while not (tmp_path / "child.pid").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int((tmp_path / "child.pid").read_text())
    try:
        assert training_runs.run_state(run_dir)[0]["state"] == "starting"
        assert training_runs.stop_run(run_dir)
        assert _ended_soon(child), "Stop left the launcher's child training"
        assert _ended_soon(launcher_pid)
        deadline = time.monotonic() + 10  # the reaper thread records the launcher's exit code
        while training_runs.read_launch(run_dir)["returncode"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert training_runs.run_state(run_dir)[0]["state"] == "stopped"
    finally:
        ProcessTree(child).kill()


def test_a_process_created_after_the_record_is_not_the_recorded_one():
    now = time.time()
    assert is_running(os.getpid(), created_by=now)
    assert not is_running(os.getpid(), created_by=now - 3600)  # this pid was reused since: another process
    assert not is_running(None) and not is_running(0)


def test_a_run_whose_pid_was_reused_after_its_last_status_reads_as_failed(tmp_path):
    sleeper = _sleeper()
    try:
        an_hour_ago = runs.datetime.fromtimestamp(time.time() - 3600, runs.UTC).isoformat(timespec="seconds")
        write_json_atomic(RunDir(tmp_path).status, {"state": "running", "pid": sleeper.pid,
                                                    "host": runs.socket.gethostname(), "updated": an_hour_ago})
        status = read_status(tmp_path)
        assert (status["state"], status["alive"]) == ("failed", False)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_launch_record_whose_pid_was_reused_is_not_alive(tmp_path):
    sleeper = _sleeper()
    run_dir = tmp_path / "run"
    try:
        folder = training_runs.launch_dir(run_dir)
        folder.mkdir()
        record = {"pid": sleeper.pid, "host": runs.socket.gethostname(), "command": "pretrain", "argv": sleeper.args,
                  "run_dir": str(run_dir), "started": time.time() - 3600, "returncode": None, "stop_requested": False}
        write_json_atomic(folder / "launch.json", record)
        assert training_runs.run_state(run_dir)[0]["state"] == "failed"
        write_json_atomic(folder / "launch.json", {**record, "started": time.time()})
        assert training_runs.run_state(run_dir)[0]["state"] == "starting"
    finally:
        sleeper.kill()
        sleeper.wait()


@posix_only
def test_without_psutil_liveness_and_the_group_stop_still_work():
    """Slicer's Python before the worker's packages are installed: no psutil."""
    code = textwrap.dedent("""
        import json, subprocess, sys
        sys.modules["psutil"] = None  # import psutil now raises ImportError
        from mim3d.processes import ProcessTree, is_running
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        tree = ProcessTree(worker.pid)
        stopped = tree.terminate()
        worker.wait(timeout=10)
        print(json.dumps([is_running(__import__("os").getpid()), is_running(worker.pid), stopped, worker.returncode]))
        """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO / "MiMSegmentation")})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [True, False, True, -signal.SIGTERM]
