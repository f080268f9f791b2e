"""MiMSegmentationLib.worker: real worker processes (the real `mim3d segment` and `mim3d devices`, and small Python
stand-ins for crashes and process trees) watched through WorkerJob with a scheduler the test drives, as Slicer's
QTimer would: events in order on the polling thread only, one outcome, cancel that leaves no process and no output.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import threading
from pathlib import Path

import pytest
import torch
from job_helpers import ManualScheduler, Recorder, python_command, run_job, save_tiny_package, segment_command

import mim3d
from mim3d import devices
from mim3d.protocol import EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_OK, Emitter, parse_line
from MiMSegmentationLib.worker import WorkerJob, default_python, launch, stop_process_tree, worker_command, worker_env

STAGES = ["load", "preprocess", "windows", "postprocess", "write"]
posix_only = pytest.mark.skipif(os.name == "nt", reason="process groups and /proc")


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory) -> Path:
    """6 windows on example_ct_sm."""
    return save_tiny_package(tmp_path_factory.mktemp("models") / "tiny", spacing_mm=5.0)


def collapse(stages: list[str]) -> list[str]:
    return [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]


def test_worker_command_runs_mim3d_as_a_module_of_the_given_python():
    assert worker_command("segment", ["ct.nrrd", Path("out")], python="/opt/py") == [
        "/opt/py", "-m", "mim3d", "segment", "ct.nrrd", "out"]
    assert worker_command("devices", [])[:4] == [default_python(), "-m", "mim3d", "devices"]


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n", encoding="utf-8")
    path.chmod(0o755)
    return path


@posix_only
def test_default_python_is_pythonslicer_beside_the_interpreter_then_on_path_inside_slicer(tmp_path, monkeypatch):
    python = _executable(tmp_path / "host" / "python3")
    on_path = _executable(tmp_path / "slicer" / "bin" / "PythonSlicer")
    monkeypatch.setattr(sys, "executable", str(python))
    monkeypatch.setenv("PATH", str(on_path.parent))
    monkeypatch.delitem(sys.modules, "slicer", raising=False)
    assert default_python() == str(python)  # outside Slicer a PythonSlicer on PATH is not ours to use
    monkeypatch.setitem(sys.modules, "slicer", object())
    assert default_python() == str(on_path)
    beside = _executable(tmp_path / "host" / "PythonSlicer")
    assert default_python() == str(beside)


def test_worker_env_puts_this_mim3d_first_and_keeps_the_rest(monkeypatch):
    library = str(Path(mim3d.__file__).resolve().parent.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/a", library, "/b"]))
    monkeypatch.setenv("MIM3D_TEST_KEEP", "kept")
    env = worker_env({"CUDA_VISIBLE_DEVICES": "-1"})
    assert env["PYTHONPATH"] == os.pathsep.join([library, "/a", "/b"])
    assert (env["PYTHONUNBUFFERED"], env["PYTHONUTF8"], env["CUDA_VISIBLE_DEVICES"]) == ("1", "1", "-1")
    assert env["MIM3D_TEST_KEEP"] == "kept" and "CUDA_VISIBLE_DEVICES" not in os.environ


def test_segment_job_delivers_every_stage_in_order_then_the_result_on_the_polling_thread(
        tiny_package, example_ct_sm_path, tmp_path):
    output = tmp_path / "seg.nii.gz"
    scheduler, recorder = ManualScheduler(), Recorder()
    job = run_job(segment_command(example_ct_sm_path, tiny_package, output), recorder, scheduler)

    outcome = recorder.outcomes[0]
    assert (outcome.returncode, outcome.cancelled, outcome.error, outcome.message) == (EXIT_OK, False, None,
                                                                                         "Finished.")
    assert outcome.result is recorder.events[-1] and outcome.result["outputs"] == [str(output)] and output.is_file()
    progress = [e for e in recorder.events if e["type"] == "progress"]
    assert len(progress) == len(recorder.events) - 1
    assert collapse([e["stage"] for e in progress]) == STAGES
    for stage in STAGES:
        fractions = [e["fraction"] for e in progress if e["stage"] == stage]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0, (stage, fractions)
    done = [int(e["message"].split()[1].split("/")[0]) for e in progress if e["stage"] == "windows"]
    windows = outcome.result["cases"][0]["windows"]
    assert windows == 6 and done == sorted(set(done)) and done[-1] == windows
    assert recorder.threads == {threading.get_ident()}
    assert not job.running and job.elapsed_s == outcome.elapsed_s > 0
    for _ in range(3):  # polls after the end (a late timer, a direct call) deliver nothing and end nothing again
        job.poll()
    assert scheduler.pending == [] and len(recorder.outcomes) == 1


def test_cancel_in_the_windows_stage_stops_the_real_worker_with_exit_130_and_no_output(
        tiny_package, example_ct_sm_path, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    recorder = Recorder(cancel_when=lambda e: e.get("stage") == "windows")
    job = run_job(segment_command(example_ct_sm_path, tiny_package, out / "seg.seg.nrrd"), recorder)

    outcome = recorder.outcomes[0]
    assert recorder.cancelled_at is not None
    assert (outcome.returncode, outcome.cancelled, outcome.result) == (EXIT_CANCELLED, True, None)
    assert outcome.error["kind"] == "cancelled" and outcome.error is recorder.events[-1]
    assert outcome.message == f"Cancelled ({outcome.error['message']})."
    assert outcome.error["message"].startswith("stopped after ")
    assert list(out.iterdir()) == [] and not job.running
    assert recorder.threads == {threading.get_ident()}


# A worker deaf to SIGTERM whose child (also deaf: ignored signals survive exec) holds its stdout open.
TREE_WORKER = """
import json, os, signal, subprocess, sys, time
from pathlib import Path
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
def progress(fraction, message):
    print(json.dumps({"type": "progress", "stage": "windows", "fraction": fraction, "message": message}), flush=True)
progress(0.0, f"{os.getpid()} {child.pid}")
for n in range(1, 301):
    time.sleep(0.05)
    progress(n / 300, f"window {n}/300")
Path(sys.argv[1]).write_text("labels", encoding="utf-8")
"""


def _state_and_group(stat: Path) -> tuple[str, int] | None:
    """(state, process group) from /proc/PID/stat, None for a process that is gone."""
    try:
        fields = stat.read_text(encoding="utf-8").rsplit(")", 1)[1].split()  # the fields after "pid (comm)"
    except OSError:
        return None
    return fields[0], int(fields[2])


def _living_members(group: int) -> list[int]:
    """Processes of process group ``group`` that are neither zombies nor gone."""
    found = {int(stat.parent.name): _state_and_group(stat) for stat in Path("/proc").glob("[0-9]*/stat")}
    return [pid for pid, info in found.items() if info is not None and info[1] == group and info[0] not in "ZX"]


@posix_only
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_cancel_kills_the_whole_tree_of_a_worker_that_ignores_sigterm(tmp_path):
    output = tmp_path / "seg.txt"
    recorder = Recorder(cancel_when=lambda e: e["message"].startswith("window 2/"))
    job = run_job(python_command(TREE_WORKER, str(output)), recorder, cancel_grace_s=0.5, timeout_s=30)

    outcome = recorder.outcomes[0]
    worker, child = map(int, recorder.events[0]["message"].split())
    assert (outcome.returncode, outcome.cancelled, outcome.message) == (-signal.SIGKILL, True, "Cancelled.")
    assert _living_members(group=worker) == [] and not job.running
    assert _state_and_group(Path(f"/proc/{child}/stat")) in (None, ("Z", worker))
    assert recorder.events[-1]["message"].startswith("window ") and not output.exists()
    job.poll()
    assert len(recorder.outcomes) == 1


@posix_only
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_stop_process_tree_ends_a_worker_by_sigterm_and_kills_one_that_ignores_it(tmp_path):
    with launch(python_command("import time; print('up', flush=True); time.sleep(30)")) as polite:
        assert polite.stdout.readline() == "up\n"
        stop_process_tree(polite, grace_s=10)
    assert polite.returncode == -signal.SIGTERM

    with launch(python_command(TREE_WORKER, str(tmp_path / "seg.txt"))) as deaf:
        worker, child = map(int, json.loads(deaf.stdout.readline())["message"].split())
        stop_process_tree(deaf, grace_s=0.3)
    assert deaf.returncode == -signal.SIGKILL and _living_members(group=worker) == []
    assert _state_and_group(Path(f"/proc/{child}/stat")) in (None, ("Z", worker))


def test_a_model_folder_without_model_json_fails_with_the_workers_message_and_exit_2(example_ct_sm_path, tmp_path):
    no_json = tmp_path / "no-json"
    no_json.mkdir()
    recorder = Recorder()
    run_job(segment_command(example_ct_sm_path, no_json, tmp_path / "out" / "seg.nii.gz"), recorder)

    outcome = recorder.outcomes[0]
    assert (outcome.returncode, outcome.cancelled, outcome.result) == (EXIT_BAD_INPUT, False, None)
    assert outcome.error == {"type": "error", "kind": "bad_input", "message": outcome.message}
    assert outcome.message.startswith(f"{no_json}: not a mim3d model package (no model.json)")
    assert any(outcome.message in line for line in outcome.log_tail)  # the worker also logs it on stderr
    assert not (tmp_path / "out").exists()


def test_a_crash_without_an_error_event_reports_the_exit_code_and_the_last_log_lines():
    recorder = Recorder()
    run_job(python_command("import sys; print('starting', file=sys.stderr); sys.stderr.write('boom\\n'); "
                           "sys.exit(3)"), recorder)

    outcome = recorder.outcomes[0]
    assert (outcome.returncode, outcome.cancelled, outcome.result, outcome.error) == (3, False, None, None)
    assert outcome.log_tail == ("starting", "boom") and recorder.logs == ["starting", "boom"]
    assert outcome.message == ("The worker exited with code 3 without reporting an error. Its last log lines:\n"
                               "starting\nboom")


@posix_only
def test_a_worker_killed_by_the_system_says_so_in_plain_words():
    recorder = Recorder()
    run_job(python_command("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"), recorder)

    outcome = recorder.outcomes[0]
    assert (outcome.returncode, outcome.cancelled) == (-signal.SIGKILL, False)
    assert outcome.message == ("The worker was stopped by SIGKILL (often: the computer ran out of memory) without "
                               "reporting an error.")


def test_stdout_lines_that_are_not_events_are_log_lines_and_events_keep_their_order():
    code = ("import json, sys\n"
            "for n in range(3):\n"
            "    print(json.dumps({'type': 'progress', 'stage': 'load', 'fraction': n / 2, 'message': str(n)}))\n"
            "    print(f'plain {n}')\n"
            "print(json.dumps({'type': 'metric', 'step': 1, 'epoch': 0, 'values': {}}))\n"
            "print('{\"type\": \"unknown\"}')\n"
            "print(json.dumps({'type': 'result', 'value': 'ü'}))\n")
    recorder = Recorder()
    run_job(python_command(code), recorder)

    assert [e.get("message", e["type"]) for e in recorder.events] == ["0", "1", "2", "metric", "result"]
    assert recorder.logs == ["plain 0", "plain 1", "plain 2", '{"type": "unknown"}']
    assert recorder.outcomes[0].result == {"type": "result", "value": "ü"}


@posix_only
def test_wait_polls_without_a_scheduler_times_out_while_the_worker_runs_and_returns_the_outcome():
    job = WorkerJob(python_command("import time; print('up', flush=True); time.sleep(30)"), poll_ms=20,
                    cancel_grace_s=5)
    job.start()
    with pytest.raises(TimeoutError, match="still running after 0.3 s"):
        job.wait(0.3)
    assert job.running and job.elapsed_s >= 0.3
    job.cancel()
    outcome = job.wait(10)
    assert (outcome.returncode, outcome.cancelled, outcome.message) == (-signal.SIGTERM, True, "Cancelled.")
    assert outcome.log_tail == ("up",) and job.wait(0) is outcome
    with pytest.raises(RuntimeError, match="runs once"):
        job.start()


def test_devices_reports_torch_and_the_cuda_gpus_it_can_use():
    job = WorkerJob(worker_command("devices", [], python=sys.executable))
    with pytest.raises(RuntimeError, match="before waiting"):
        job.wait(1)
    job.start()
    outcome = job.wait(60)

    assert outcome.ok and outcome.result["torch"] == torch.__version__
    assert outcome.result["cuda_build"] == torch.version.cuda
    assert 1 <= outcome.result["cpu_threads"] <= os.cpu_count()
    assert outcome.result["cpu_bf16"] == devices.cpu_computes_bf16()
    gpus = outcome.result["cuda"]
    if not torch.cuda.is_available():
        assert (gpus, outcome.result["recommended"]) == ([], "cpu")
        return
    assert outcome.result["recommended"] == "cuda"
    assert [g["index"] for g in gpus] == list(range(torch.cuda.device_count()))
    for gpu in gpus:
        properties = torch.cuda.get_device_properties(gpu["index"])
        assert gpu["name"] == properties.name and gpu["capability"] == f"{properties.major}.{properties.minor}"
        assert gpu["total_mb"] == properties.total_memory // 2**20 and 0 < gpu["free_mb"] <= gpu["total_mb"]


def test_devices_without_torch_lists_only_the_cpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    stream = io.StringIO()
    devices.run(None, Emitter(stream))
    assert [parse_line(line) for line in stream.getvalue().splitlines()] == [{
        "type": "result", "torch": None, "cuda_build": None, "cuda": [], "recommended": "cpu",
        "cpu_threads": os.cpu_count(), "cpu_bf16": False}]
