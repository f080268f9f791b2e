"""Run folders as another process reads them (mim3d.runs): atomic status, metrics read while being written, stop
requests, and runs whose process died."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mim3d import runs
from mim3d.runs import RunDir, read_metrics, read_status, request_stop, write_json_atomic

REPO = Path(__file__).resolve().parents[1]


def _status(run: Path, state: str, pid: int, **fields) -> None:
    write_json_atomic(RunDir(run).status, {"state": state, "pid": pid, "host": runs.socket.gethostname(),
                                           "step": 3, "updated": runs.now_iso(), **fields})


def test_status_written_atomically_reads_back_and_leaves_no_temporary_file(tmp_path):
    _status(tmp_path, "finished", os.getpid(), message="all 3 steps done")
    write_json_atomic(RunDir(tmp_path).status, {**read_status(tmp_path), "step": 4})
    assert read_status(tmp_path)["step"] == 4
    assert read_status(tmp_path)["message"] == "all 3 steps done"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path):
    _status(tmp_path, "running", os.getpid())
    with pytest.raises(ValueError):
        write_json_atomic(RunDir(tmp_path).status, {"state": float("nan")})  # strict JSON refuses NaN mid-write
    assert read_status(tmp_path)["state"] == "running"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_folder_without_status_reads_as_missing(tmp_path):
    assert read_status(tmp_path)["state"] == "missing"


def test_metrics_reader_leaves_a_partly_written_last_line_for_the_next_read(tmp_path):
    metrics = RunDir(tmp_path).metrics
    metrics.write_text('{"kind": "train", "step": 1, "loss": 0.9}\n{"kind": "train", "step": 2, "lo')
    assert read_metrics(tmp_path) == [{"kind": "train", "step": 1, "loss": 0.9}]
    with open(metrics, "a") as f:
        f.write('ss": 0.8}\n{"kind": "train", "step": 3, "loss": 0.7}\n')
    assert [entry["step"] for entry in read_metrics(tmp_path, since_line=1)] == [2, 3]


def test_metrics_reader_keeps_the_line_count_across_an_unreadable_line(tmp_path):
    RunDir(tmp_path).metrics.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    entries = read_metrics(tmp_path)
    assert entries[1] == {"kind": "unreadable", "text": "not json"}
    assert len(entries) == 3
    assert read_metrics(tmp_path / "no-such-run") == []


def test_request_stop_creates_the_stop_file(tmp_path):
    stop = request_stop(tmp_path)
    assert stop == tmp_path / "STOP" and stop.exists()


def test_running_run_of_a_live_process_reads_as_running(tmp_path):
    _status(tmp_path, "running", os.getpid())
    status = read_status(tmp_path)
    assert (status["state"], status["alive"]) == ("running", True)


def test_running_run_whose_process_ended_reads_as_failed(tmp_path):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _status(tmp_path, "running", int(ended.stdout))
    status = read_status(tmp_path)
    assert (status["state"], status["alive"]) == ("failed", False)
    assert "--resume" in status["message"] and str(int(ended.stdout)) in status["message"]


def test_killed_child_not_yet_reaped_is_not_alive(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(child.pid, signal.SIGKILL)
        while Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1][0] != "Z":
            pass  # wait for the kill to land, without reaping the zombie
        assert not runs.is_alive({"pid": child.pid, "host": runs.socket.gethostname()})
    finally:
        child.wait()


def test_process_on_another_host_is_assumed_alive():
    assert runs.is_alive({"pid": 1, "host": "another-host-" + runs.socket.gethostname()})
    assert not runs.is_alive({"pid": None})


def test_list_runs_gives_each_run_newest_first(tmp_path):
    for name, updated in (("old", "2026-01-01T00:00:00+00:00"), ("new", "2026-02-01T00:00:00+00:00")):
        (tmp_path / name).mkdir()
        write_json_atomic(RunDir(tmp_path / name).status, {"state": "finished", "pid": 1, "updated": updated})
    (tmp_path / "not-a-run").mkdir()
    assert [Path(r["run_dir"]).name for r in runs.list_runs(tmp_path)] == ["new", "old"]
    assert runs.list_runs(tmp_path / "absent") == []


def test_runs_module_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import mim3d.runs; print(json.dumps(mim3d.runs.STATES))"
    done = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "MiMSegmentation")})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == list(runs.STATES)


@pytest.mark.parametrize("state, offered", [("finished", True), ("stopped", True), ("failed", False),
                                            ("running", False)])
def test_a_pretraining_run_offers_its_last_checkpoint_once_finished_or_stopped(state, offered, tmp_path):
    """A failed or running run's last.pt is only the last epoch it reached, not the run's final weights."""
    from mim3d.errors import BadInputError

    run = RunDir(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    run.checkpoint("last").write_bytes(b"")
    write_json_atomic(run.config, {"command": "pretrain", "model": {"method": "mim"}})
    write_json_atomic(run.status, {"state": state, "pid": os.getpid()})  # a live pid: "running" stays running
    if offered:
        assert runs.pretrained_checkpoint(run.path) == run.checkpoint("last")
        assert runs.pretrained_checkpoint(run.path, "mim-unetr") == run.checkpoint("last")
    else:
        with pytest.raises(BadInputError, match=f"{run.path}: the pre-training run is {state}; use it once it has "
                           "finished or been stopped"):
            runs.pretrained_checkpoint(run.path)


def test_a_pretraining_run_for_another_architecture_is_refused_with_the_one_to_use(tmp_path):
    from mim3d.errors import BadInputError

    write_json_atomic(RunDir(tmp_path).config, {"command": "pretrain", "model": {"method": "mae"}})
    with pytest.raises(BadInputError, match="a mae pre-training run; its encoder fine-tunes with --arch unetr, not "
                       "--arch mim-unetr"):
        runs.pretrained_checkpoint(tmp_path, "mim-unetr")
