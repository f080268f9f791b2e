"""MiMSegmentationLib.segment_panel: the Segment panel's states, button, progress and messages. Runs that end in a
particular way are real worker processes (the real `mim3d segment` for success and bad input, Python stand-ins for
a crash and a cancel); the rest is driven with protocol event dicts. Time comes from a clock the test sets.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from job_helpers import (
    ONE_THREAD,
    ManualScheduler,
    Recorder,
    python_command,
    run_job,
    save_tiny_package,
    segment_command,
)

from MiMSegmentationLib.segment_panel import PanelState, PanelView, SegmentPanel, format_elapsed
from MiMSegmentationLib.worker import JobOutcome, WorkerJob, worker_command, worker_env


class Clock:
    """Seconds that move only when the test says so."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def progress(stage: str, fraction: float, message: str = "") -> dict:
    return {"type": "progress", "stage": stage, "fraction": fraction, "message": message}


def outcome(returncode: int = 0, result: dict | None = None, cancelled: bool = False, message: str = "Finished."):
    """An outcome as WorkerJob builds it, for the cases a real worker cannot produce on demand."""
    return JobOutcome(returncode=returncode, cancelled=cancelled, result=result, error=None, message=message,
                      log_tail=(), elapsed_s=1.0)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """2 windows on example_ct_sm."""
    return save_tiny_package(tmp_path_factory.mktemp("models") / "tiny", spacing_mm=8.0)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def panel(clock) -> SegmentPanel:
    return SegmentPanel(clock=clock)


def running(panel: SegmentPanel, clock: Clock) -> SegmentPanel:
    panel.start()
    clock.now += 65
    return panel


def test_segment_cannot_start_without_an_installed_model_and_an_input_and_says_why(panel):
    cases = [((False, True), "Choose an input volume."), ((True, False), "Choose a model."),
             ((False, False), "Choose an input volume."),
             ((True, True, False), "The chosen model is not installed: download or import it first.")]
    for inputs, reason in cases:
        view = panel.view(*inputs)
        assert (view.apply_text, view.apply_enabled, view.apply_tooltip, view.status) == (
            "Segment", False, reason, reason), inputs
        assert view.inputs_enabled and view.progress == 0
    assert panel.view(True, True) == PanelView(
        state=PanelState.IDLE, apply_text="Segment", apply_enabled=True, apply_tooltip="", inputs_enabled=True,
        busy=False, progress=0, status="Ready.", device="")


def test_a_running_job_turns_segment_into_cancel_and_locks_the_inputs(panel, clock):
    running(panel, clock)
    view = panel.view(True, True)
    assert (view.state, view.apply_text, view.apply_enabled, view.inputs_enabled, view.busy) == (
        PanelState.RUNNING, "Cancel", True, False, True)
    assert view.status == "starting the worker (01:05)" and view.apply_tooltip == ""
    assert panel.start_blocker(True, True) == "A segmentation is already running."
    with pytest.raises(RuntimeError, match="while running"):
        panel.start()


def test_progress_follows_the_stage_weights_and_never_goes_back(panel, clock):
    running(panel, clock)
    steps = [(progress("load", 0.0, "reading ct.nrrd"), 0, "load: reading ct.nrrd"),
             (progress("load", 1.0), 5, "load"),
             (progress("preprocess", 0.3, "resampling"), 8, "preprocess: resampling"),
             (progress("windows", 12 / 40, "window 12/40"), 34, "windows: window 12/40"),
             (progress("windows", 0.0, "warning: values do not look like CT"), 34,
              "windows: warning: values do not look like CT"),
             ({"type": "metric", "step": 1, "epoch": 0, "values": {}}, 34, "windows: warning: values do not look "
                                                                           "like CT"),
             (progress("windows", 1.0, "window 40/40"), 80, "windows: window 40/40"),
             (progress("postprocess", 0.6), 86, "postprocess"),
             (progress("write", 1.0, "wrote seg.nrrd"), 95, "write: wrote seg.nrrd")]
    for event, percent, line in steps:
        panel.on_event(event)
        view = panel.view(True, True)
        assert (view.progress, view.status) == (percent, f"{line} (01:05)"), event


def test_elapsed_time_reads_mm_ss_and_h_mm_ss_from_one_hour():
    assert [format_elapsed(s) for s in (0, 59.9, 65, 3599, 3725)] == ["00:00", "00:59", "01:05", "59:59", "1:02:05"]


def test_a_real_segment_run_imports_then_ends_done_with_the_segment_count_and_time(panel, clock, tiny_model,
                                                                                    example_ct_sm_path, tmp_path):
    views, states = [], []

    def on_event(event):  # wired as the Widget wires it, rendering after every event
        panel.on_event(event)
        views.append(panel.view(True, True))

    def on_finished(outcome):
        states.append(panel.finished(outcome))

    scheduler = ManualScheduler()
    job = WorkerJob(segment_command(example_ct_sm_path, tiny_model, tmp_path / "seg.seg.nrrd"),
                    worker_env(ONE_THREAD), schedule=scheduler, poll_ms=20, on_event=on_event, on_finished=on_finished)
    job.start()
    panel.start()
    scheduler.run_until(lambda: bool(states), 60)
    assert job.outcome.ok and states == [PanelState.IMPORTING]
    assert [v.progress for v in views] == sorted(v.progress for v in views) and views[-1].progress == 95
    assert all(v.apply_text == "Cancel" and not v.inputs_enabled for v in views)
    assert views[-1].status == f"write: wrote {tmp_path / 'seg.seg.nrrd'} (00:00)"

    clock.now += 12
    view = panel.view(True, True)
    assert (view.apply_text, view.apply_enabled, view.inputs_enabled, view.progress) == ("Segment", False, False, 95)
    assert view.status == "importing the segmentation (00:12)"
    clock.now += 2
    panel.import_done(2)
    clock.now += 30  # the clock stops with the run
    view = panel.view(True, True)
    assert (view.state, view.progress, view.status) == (PanelState.DONE, 100, "Done: 2 segments in 00:14.")
    assert (view.apply_text, view.apply_enabled, view.inputs_enabled, view.busy) == ("Segment", True, True, False)


def test_a_real_bad_input_fails_with_the_workers_message_and_allows_a_new_run(panel, clock, tiny_model, tmp_path):
    missing = tmp_path / "missing.nrrd"
    recorder = Recorder()
    running(panel, clock)
    run_job(segment_command(missing, tiny_model, tmp_path / "seg.seg.nrrd"), recorder)
    assert panel.finished(recorder.outcomes[0]) is PanelState.FAILED
    view = panel.view(True, True)
    assert view.status == f"Failed: {missing}: no such file or folder."
    assert (view.apply_text, view.apply_enabled, view.inputs_enabled) == ("Segment", True, True)
    assert panel.view(True, False).status == view.status  # the failure stays readable; the tooltip says why
    assert panel.view(True, False).apply_tooltip == "Choose a model."
    panel.start()
    assert (panel.state, panel.final_message, panel.view(True, True).progress) == (PanelState.RUNNING, "", 0)


def test_a_real_crash_fails_with_the_exit_code_and_the_last_log_lines(panel, clock):
    recorder = Recorder()
    running(panel, clock)
    run_job(python_command("import sys; sys.stderr.write('Segmentation fault\\n'); sys.exit(139)"), recorder)
    panel.finished(recorder.outcomes[0])
    assert panel.view(True, True).status == ("Failed: The worker exited with code 139 without reporting an error. "
                                             "Its last log lines:\nSegmentation fault")


def test_cancel_goes_through_cancelling_to_cancelled_with_a_real_worker(panel, clock):
    def on_event(event):  # the user clicks Cancel as soon as the first progress shows
        panel.cancel_requested()
        job.cancel()

    scheduler, outcomes = ManualScheduler(), []
    code = ("import json, time; print(json.dumps({'type': 'progress', 'stage': 'load', 'fraction': 0.0})); "
            "time.sleep(30)")
    job = WorkerJob(python_command(code), schedule=scheduler, poll_ms=20, on_event=on_event,
                    on_finished=outcomes.append)
    job.start()
    running(panel, clock)
    scheduler.run_until(lambda: panel.state is PanelState.CANCELLING, 30)
    clock.now += 3
    view = panel.view(True, True)
    assert (view.apply_text, view.apply_enabled, view.inputs_enabled, view.status) == (
        "Cancelling…", False, False, "cancelling (01:08)")
    scheduler.run_until(lambda: bool(outcomes), 30)
    assert outcomes[0].cancelled
    assert panel.finished(outcomes[0]) is PanelState.CANCELLED
    clock.now += 5
    view = panel.view(True, True)
    assert (view.status, view.apply_text, view.apply_enabled, view.inputs_enabled) == (
        "Cancelled after 01:08.", "Segment", True, True)


def test_a_cancel_click_wins_over_a_worker_that_finished_anyway(panel, clock):
    running(panel, clock)
    panel.cancel_requested()
    assert panel.finished(outcome(result={"type": "result", "outputs": ["seg.nrrd"]})) is PanelState.CANCELLED


def test_a_worker_that_exits_0_without_a_result_is_a_failure(panel, clock):
    running(panel, clock)
    assert panel.finished(outcome()) is PanelState.FAILED
    assert panel.final_message == "Failed: the worker finished without a result."


def test_an_import_failure_ends_the_run_failed_with_the_reason(panel, clock):
    running(panel, clock)
    panel.finished(outcome(result={"type": "result", "outputs": ["seg.nrrd"]}))
    panel.import_failed("seg.nrrd: could not be read")
    assert (panel.state, panel.view(True, True).status) == (
        PanelState.FAILED, "Failed to import the segmentation: seg.nrrd: could not be read")


def test_the_done_message_gives_the_workers_warnings_without_the_temporary_input_path(panel, clock):
    result = {"type": "result", "cases": [{"input": "/tmp/Slicer/ct.nrrd"}],
              "warnings": ["/tmp/Slicer/ct.nrrd: values do not look like CT", "other: kept as is"]}
    running(panel, clock)
    panel.finished(outcome(result=result))
    panel.import_done(1)
    assert panel.final_message == "Done: 1 segment in 01:05. Warning: values do not look like CT; other: kept as is"


def test_events_and_outcomes_outside_a_run_change_nothing(panel, clock):
    panel.on_event(progress("windows", 0.5, "window 1/2"))
    panel.cancel_requested()
    panel.import_done(3)
    assert panel.finished(outcome(result={"type": "result"})) is PanelState.IDLE
    assert panel.view(True, True).status == "Ready." and panel.view(True, True).progress == 0
    running(panel, clock)
    panel.cancel_requested()
    panel.on_event(progress("windows", 0.5, "window 1/2"))  # a late event while cancelling
    assert panel.view(True, True).progress == 0


def test_the_device_line_comes_from_a_real_devices_job(panel):
    job = WorkerJob(worker_command("devices", [], python=sys.executable))
    job.start()
    result = job.wait(60).result
    panel.devices_checked(job.outcome)
    if result["cuda"]:
        gpu = result["cuda"][0]
        expected = f"GPU: {gpu['name']}, {gpu['free_mb'] / 1024:.1f} of {gpu['total_mb'] / 1024:.1f} GB free"
    else:
        bf16 = ", bf16" if result["cpu_bf16"] else ""
        expected = f"CPU, {result['cpu_threads']} threads{bf16} (no CUDA GPU found)"
    assert panel.view(True, True).device == expected


@pytest.mark.parametrize(("devices", "line"), [
    (outcome(result={"type": "result", "torch": "2.5.1", "recommended": "cuda", "cpu_threads": 16,
                     "cuda": [{"index": 0, "name": "NVIDIA H100", "total_mb": 81559, "free_mb": 80011}]}),
     "GPU: NVIDIA H100, 78.1 of 79.6 GB free"),
    (outcome(result={"type": "result", "torch": None, "recommended": "cpu", "cpu_threads": 4, "cuda": []}),
     "PyTorch is not installed."),
    (outcome(result={"type": "result", "torch": "2.5.1", "recommended": "cpu", "cpu_threads": 8, "cuda": [],
                     "cpu_bf16": True}),
     "CPU, 8 threads, bf16 (no CUDA GPU found)"),
    (outcome(result={"type": "result", "torch": "2.5.1", "recommended": "cpu", "cpu_threads": 4, "cuda": [],
                     "cpu_bf16": False}),
     "CPU, 4 threads (no CUDA GPU found)"),
    (outcome(returncode=1, message="ImportError: libcudart.so.12"),
     "Device check failed: ImportError: libcudart.so.12"),
])
def test_the_device_line_names_the_gpu_a_missing_torch_or_a_failed_check(panel, devices, line):
    panel.devices_checked(devices)
    assert panel.view(True, True).device == line


def _devices_job(without_torch: bool = False):
    """The real `mim3d devices` in a worker process, optionally in a Python where torch cannot be imported (Slicer
    before the PyTorch extension installed it)."""
    block = "sys.modules['torch'] = None; " if without_torch else ""
    job = WorkerJob([sys.executable, "-c", f"import runpy, sys; {block}sys.argv = ['mim3d', 'devices']; "
                     "runpy.run_module('mim3d', run_name='__main__', alter_sys=True)"])
    job.start()
    return job.wait(60)


def test_devices_are_checked_again_once_pytorch_is_installed_and_a_gpu_withdraws_fast_mode(panel):
    assert panel.needs_device_check(torch_installed=False)  # at module setup: never checked
    panel.device_check_started()
    assert not panel.needs_device_check(torch_installed=True)  # one is running
    assert panel.devices_checked(_devices_job(without_torch=True)) is True  # CPU: fast mode suggested
    assert panel.view(True, True).device == "PyTorch is not installed."
    assert not panel.needs_device_check(torch_installed=False)
    assert panel.needs_device_check(torch_installed=True)  # PyTorch was installed since: check again

    with_torch = _devices_job()
    panel.device_check_started()
    on_cpu = with_torch.result["recommended"] == "cpu"  # this host's answer: True on CPU, a GPU withdraws fast mode
    assert panel.devices_checked(with_torch) is on_cpu
    assert not panel.needs_device_check(torch_installed=True)

    gpu = outcome(result={"type": "result", "torch": "2.5.1", "recommended": "cuda", "cpu_threads": 16,
                          "cuda": [{"index": 0, "name": "NVIDIA H100", "total_mb": 81559, "free_mb": 80011}]})
    assert panel.devices_checked(gpu) is (False if on_cpu else None)  # the panel's own CPU suggestion is withdrawn
    assert panel.devices_checked(gpu) is None  # the user's choice is left alone from then on
    assert panel.devices_checked(outcome(returncode=1, message="ImportError")) is None
    assert panel.needs_device_check(torch_installed=True)  # the failed check is retried


def test_the_panel_and_the_runner_load_no_heavy_module():
    code = ("import sys\n"
            "for name in ('torch', 'numpy', 'SimpleITK', 'monai', 'qt', 'slicer', 'vtk'):\n"
            "    sys.modules[name] = None  # importing any of them now fails\n"
            "import json, MiMSegmentationLib.segment_panel\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('mim3d', 'MiMSegmentationLib')))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env=worker_env(), cwd=Path(__file__).parent.parent / "MiMSegmentation").stdout
    assert json.loads(loaded) == ["MiMSegmentationLib", "MiMSegmentationLib.segment_panel", "MiMSegmentationLib.worker",
                                  "mim3d", "mim3d.processes", "mim3d.protocol"]
