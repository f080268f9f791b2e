"""`mim3d pretrain` as users and the Slicer panel run it: real `python -m mim3d pretrain` subprocesses (and torchrun)
on small synthetic scans, checked through the run folder and the protocol events on stdout.

Models are tiny versions of the `small` presets (one block per stage, 32³ network inputs), so a step takes well
under a second on a CPU; the behaviour under test (schedules, checkpoints, resume, sharding) does not depend on size.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from mim3d.__main__ import main
from mim3d.protocol import parse_line
from mim3d.runs import RunDir, read_metrics, read_status

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
TINY = {  # --override values per method: the small presets cut down to one block per stage and 32³ inputs
    "mim": ["input_size=32", "embed_dims=[6,12,24,48]", "depths=[1,1,1,1]", "num_heads=4", "decoder_dim=24",
            "decoder_depth=1", "decoder_heads=4", "level2_count=1", "level3_count=1",
            "norm_pix_loss=false"],  # raw-voxel targets: a tiny model's loss falls within a few steps
    "mae": ["input_size=32", "hidden_size=64", "mlp_dim=128", "num_layers=2", "num_heads=4", "decoder_dim=32",
            "decoder_depth=1", "decoder_heads=4"],
    "simmim": ["input_size=32", "hidden_size=64", "mlp_dim=128", "num_layers=2", "num_heads=4"],
}
STATUS_KEYS = {"state", "pid", "host", "command", "epoch", "epochs", "step", "total_steps", "eta_seconds",
               "steps_per_second", "loss", "last_checkpoint", "message", "updated"}


def write_scans(folder: Path, count: int) -> Path:
    """`count` smooth 40×48×48 CT-like volumes (int16 HU, 1.5×1.5×2 mm) as .nii.gz: every patch is predictable."""
    folder.mkdir(parents=True, exist_ok=True)
    z, y, x = np.mgrid[:40, :48, :48].astype(float)
    for i in range(count):
        hu = 600 * np.sin(x / 5 + i) * np.cos(y / 7) + 300 * np.sin(z / 4) - 100
        image = sitk.GetImageFromArray(hu.astype(np.int16))
        image.SetSpacing((1.5, 1.5, 2.0))
        sitk.WriteImage(image, str(folder / f"scan{i}.nii.gz"))
    return folder


def pretrain_args(method: str, data: Path, *extra: str, epochs: int = 6, lr: str = "2e-3") -> list[str]:
    overrides = [arg for value in TINY[method] for arg in ("--override", value)]
    return ["--data", str(data), "--method", method, "--preset", "small", *overrides, "--epochs", str(epochs),
            "--lr", lr, "--warmup-epochs", "1", "--workers", "0", "--log-every", "1", *extra]


def environment(home: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO / "MiMSegmentation"), "MIM3D_HOME": str(home)}


def mim3d_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mim3d", "pretrain", *args]


def run(command: list[str], home: Path, stderr: Path | None = None) -> subprocess.CompletedProcess:
    with open(stderr or os.devnull, "w") as err:
        return subprocess.run(command, stdout=subprocess.PIPE, stderr=err, text=True, env=environment(home),
                              timeout=TIMEOUT_S)


def protocol_events(stdout: str) -> list[dict]:
    """Every stdout line must be a protocol event."""
    events = [parse_line(line) for line in stdout.splitlines()]
    assert None not in events, f"stdout holds a line that is not a protocol event:\n{stdout}"
    return events


def train_losses(run_dir: Path) -> dict[int, float]:
    entries = [e for e in read_metrics(run_dir) if e["kind"] == "train"]
    steps = [e["step"] for e in entries]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {e["step"]: e["loss"] for e in entries}


def interrupt(command: list[str], home: Path, after_step: int, action) -> subprocess.Popen:
    """Start a run, wait for its metric event of step `after_step`, then `action(process)` while the process is
    paused (so that a fast run cannot finish first); returns once it ended."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=environment(home))
    try:
        for line in process.stdout:
            event = parse_line(line)
            if event and event["type"] == "metric" and event["step"] >= after_step:
                process.send_signal(signal.SIGSTOP)
                action(process)
                process.send_signal(signal.SIGCONT)
                break
        process.stdout.read()
        process.wait(TIMEOUT_S)
    finally:
        process.kill()
        process.wait()
    return process


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mim3d-home")


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    return write_scans(tmp_path_factory.mktemp("scans"), 2)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, scans, home) -> Path:
    """An uninterrupted MAE run of 12 steps (6 epochs of 2 volumes) that stopped and killed runs must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = run(mim3d_command(*pretrain_args("mae", scans, "--out", str(out))), home)
    assert done.returncode == 0, done.stdout
    return out


# ---- a run and its folder -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["mim", "mae", "simmim"])
def test_short_run_lowers_the_loss_and_writes_every_file_of_the_run_folder(method, scans, home, tmp_path):
    out = tmp_path / "run"
    done = run(mim3d_command(*pretrain_args(method, scans, "--out", str(out), epochs=5)), home, tmp_path / "err")
    assert done.returncode == 0, (tmp_path / "err").read_text()[-3000:]
    losses = list(train_losses(out).values())
    assert len(losses) == 10
    assert sum(losses[-2:]) / 2 < 0.85 * sum(losses[:2]) / 2, losses

    events = protocol_events(done.stdout)
    assert events[-1] == {**events[-1], "type": "result", "state": "finished", "step": 10, "run_dir": str(out)}
    fractions = [e["fraction"] for e in events if e["type"] == "progress" and e["stage"] == "pretrain"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [e["step"] for e in events if e["type"] == "metric"] == list(range(1, 11))

    status = read_status(out)
    assert set(status) == STATUS_KEYS
    assert (status["state"], status["step"], status["total_steps"]) == ("finished", 10, 10)
    assert status["last_checkpoint"] == "checkpoints/last.pt"

    config = json.loads((out / "config.json").read_text())
    assert config["model"]["method"] == method and config["model"]["config"]["input_size"] == 32
    assert config["optimization"]["effective_batch"] == 1 and config["optimization"]["lr"] == 2e-3
    assert config["data"]["summary"]["count"] == 2 and config["runtime"]["world_size"] == 1

    epochs = [e for e in read_metrics(out) if e["kind"] == "epoch"]
    assert [(e["epoch"], e["step"]) for e in epochs] == [(0, 2), (1, 4), (2, 6), (3, 8), (4, 10)]
    assert "step 10/10" in (out / "log.txt").read_text()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-5.pt", "last.pt"]
    checkpoint = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert (checkpoint["method"], checkpoint["step"], checkpoint["epoch"]) == (method, 10, 5)
    assert {"model", "optimizer", "scaler", "rng", "data_position", "run"} <= checkpoint.keys()
    _assert_tensorboard_has_the_losses(out, losses)


def _assert_tensorboard_has_the_losses(out: Path, losses: list[float]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    assert len(events.Scalars("epoch/loss")) == 5


# ---- stop, kill, resume ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["STOP file", "SIGTERM"])
def test_stopped_run_resumes_to_the_losses_of_an_uninterrupted_run(how, scans, home, reference_run, tmp_path):
    out = tmp_path / "run"

    def stop(process):
        if how == "SIGTERM":
            process.send_signal(signal.SIGTERM)
        else:
            (out / "STOP").touch()

    stopped = interrupt(mim3d_command(*pretrain_args("mae", scans, "--out", str(out))), home, 1, stop)
    assert stopped.returncode == 0
    status = read_status(out)
    assert status["state"] == "stopped" and 1 <= status["step"] < 12, status
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == status["step"]

    resumed = run(mim3d_command("--resume", str(out)), home)
    assert resumed.returncode == 0
    assert protocol_events(resumed.stdout)[-1]["state"] == "finished"
    expected = train_losses(reference_run)
    assert list(train_losses(out)) == list(range(1, 13))
    assert train_losses(out) == pytest.approx(expected, rel=1e-5)


def test_run_killed_after_a_checkpoint_resumes_from_it_and_finishes(scans, home, reference_run, tmp_path):
    out = tmp_path / "run"
    killed = interrupt(mim3d_command(*pretrain_args("mae", scans, "--out", str(out))), home, 3,
                       lambda process: process.send_signal(signal.SIGKILL))
    assert killed.returncode == -signal.SIGKILL
    status = read_status(out)  # the file still says "running"; its process is gone
    assert (status["state"], status["alive"]) == ("failed", False)
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] >= 2

    resumed = run(mim3d_command("--resume", str(out)), home)
    assert resumed.returncode == 0
    assert read_status(out)["state"] == "finished"
    assert train_losses(out) == pytest.approx(train_losses(reference_run), rel=1e-5)


def test_resume_refuses_an_option_that_would_change_the_run(reference_run, home, capsys):
    assert main(["pretrain", "--resume", str(reference_run), "--epochs", "7"]) == 2
    error = protocol_events(capsys.readouterr().out)[-1]
    assert error["kind"] == "bad_input"
    assert "--epochs 7 (the run has 6)" in error["message"]


def test_non_finite_loss_fails_the_run_with_a_clear_message(scans, home, tmp_path):
    out = tmp_path / "run"
    done = run(mim3d_command(*pretrain_args("mae", scans, "--out", str(out), lr="1e30", epochs=2)), home)
    assert done.returncode == 1
    error = protocol_events(done.stdout)[-1]
    assert error["kind"] == "internal" and "non-finite loss at step" in error["message"]
    assert "lower the learning rate" in error["message"]
    status = read_status(out)
    assert status["state"] == "failed" and "non-finite loss" in status["message"]


# ---- several processes --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mim_batch_of_two(tmp_path_factory, scans, home) -> Path:
    """MiM, one process, 2 volumes per step: the run that other splits of the same global batch must reproduce."""
    out = tmp_path_factory.mktemp("batch-of-two") / "run"
    done = run(mim3d_command(*pretrain_args("mim", scans, "--out", str(out), "--batch-size", "2", epochs=2)), home)
    assert done.returncode == 0
    return out


def test_two_micro_batches_accumulated_match_one_batch_of_two(scans, home, mim_batch_of_two, tmp_path):
    done = run(mim3d_command(*pretrain_args("mim", scans, "--out", str(tmp_path / "run"), "--accum", "2",
                                            epochs=2)), home)
    assert done.returncode == 0
    assert train_losses(tmp_path / "run") == pytest.approx(train_losses(mim_batch_of_two), rel=1e-4)


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(scans, home, mim_batch_of_two, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(port), "-m", "mim3d", "pretrain"]
    two = run(torchrun + pretrain_args("mim", scans, "--out", str(tmp_path / "two"), "--batch-size", "1", epochs=2),
              home, tmp_path / "err")
    assert two.returncode == 0, (tmp_path / "err").read_text()[-3000:]
    assert json.loads((tmp_path / "two" / "config.json").read_text())["runtime"]["world_size"] == 2
    assert [e["type"] for e in protocol_events(two.stdout)].count("result") == 1  # rank 0 alone speaks
    assert train_losses(tmp_path / "two") == pytest.approx(train_losses(mim_batch_of_two), rel=1e-4)


# ---- bad input ------------------------------------------------------------------------------------------------------

def test_empty_data_folder_exits_2_naming_it_and_leaves_no_run_folder(home, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    done = run(mim3d_command(*pretrain_args("mae", tmp_path / "empty", "--out", str(out))), home)
    assert done.returncode == 2
    error = protocol_events(done.stdout)[-1]
    assert error["kind"] == "bad_input" and str(tmp_path / "empty") in error["message"]
    assert not out.exists()


def test_scan_found_unusable_during_the_run_exits_2_and_keeps_a_user_made_empty_out_folder(home, tmp_path):
    """Discovery reads headers only; a constant volume is refused when the run reads it, after the folder exists."""
    (tmp_path / "flat").mkdir()
    image = sitk.GetImageFromArray(np.zeros((40, 48, 48), np.int16))
    sitk.WriteImage(image, str(tmp_path / "flat" / "scan.nii.gz"))
    out = tmp_path / "mine"
    out.mkdir()
    done = run(mim3d_command(*pretrain_args("mae", tmp_path / "flat", "--out", str(out), epochs=1)), home)
    assert done.returncode == 2
    assert protocol_events(done.stdout)[-1]["kind"] == "bad_input"
    assert out.is_dir() and not any(out.iterdir())


def _bad_input(argv: list[str], capsys) -> str:
    """Run the CLI in this process; it must answer exit 2 with a bad_input event; returns the message."""
    assert main(["pretrain", *argv]) == 2
    error = protocol_events(capsys.readouterr().out)[-1]
    assert error["type"] == "error" and error["kind"] == "bad_input"
    return error["message"]


def test_folder_of_only_unusable_files_is_refused_with_each_file_and_reason(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    sitk.WriteImage(sitk.Image(32, 32, sitk.sitkInt16), str(bad / "slice.nii.gz"))  # 2-D
    monkeypatch.setenv("MIM3D_HOME", str(tmp_path / "home"))
    message = _bad_input(pretrain_args("mae", bad, "--out", str(tmp_path / "run")), capsys)
    assert "no usable volume" in message and "corrupt.nii.gz" in message and "slice.nii.gz" in message
    assert not (tmp_path / "run").exists()


def test_unknown_override_key_is_refused_with_a_suggestion(scans, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MIM3D_HOME", str(tmp_path / "home"))
    argv = pretrain_args("mim", scans, "--out", str(tmp_path / "run"), "--override", "levl2_count=2")
    message = _bad_input(argv, capsys)
    assert "'levl2_count'" in message and "Did you mean 'level2_count'" in message
    assert not (tmp_path / "run").exists()


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("content", ["text", "pickle that runs code"])
def test_init_file_that_is_not_a_safe_checkpoint_is_refused(content, scans, tmp_path, capsys, monkeypatch):
    init = tmp_path / "weights.pth"
    if content == "text":
        init.write_text("these are not weights\n")
    else:
        torch.save({"model": _RunsCode()}, init)  # a .pth whose unpickling would call os.system
    monkeypatch.setenv("MIM3D_HOME", str(tmp_path / "home"))
    message = _bad_input(pretrain_args("mae", scans, "--out", str(tmp_path / "run"), "--init", str(init)), capsys)
    assert str(init) in message
    assert ("refused to unpickle" if content != "text" else "cannot be read as a PyTorch checkpoint") in message
    assert not (tmp_path / "run").exists()


def test_out_folder_holding_a_run_is_refused_and_left_untouched(reference_run, scans, tmp_path, capsys,
                                                                monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in reference_run.rglob("*")}
    monkeypatch.setenv("MIM3D_HOME", str(tmp_path / "home"))
    message = _bad_input(pretrain_args("mae", scans, "--out", str(reference_run)), capsys)
    assert f"--out {reference_run}: already holds a run (state finished)" in message and "--resume" in message
    assert {p: p.stat().st_mtime_ns for p in reference_run.rglob("*")} == before


# ---- --init ---------------------------------------------------------------------------------------------------------

def test_init_from_a_mim3d_checkpoint_starts_from_its_weights(scans, home, reference_run, tmp_path):
    from mim3d.data import discover_volumes
    from mim3d.data.transforms import pretraining_dataset
    from mim3d.models import build_pretrainer, load_pretrained
    from mim3d.run_options import parse_overrides
    from mim3d.training.distributed import Sharding, World
    from mim3d.training.pretrain import _loss

    source = RunDir(reference_run).checkpoint("last")
    out = tmp_path / "run"
    done = run(mim3d_command(*pretrain_args("mae", scans, "--out", str(out), "--init", str(source), epochs=1)), home)
    assert done.returncode == 0
    # The loss of the source weights on the run's first volume and masks, computed here.
    model = build_pretrainer("mae", "small", **parse_overrides(TINY["mae"]))
    load_pretrained(model, source)
    dataset = pretraining_dataset(discover_volumes([scans]).volumes, 32, home / "cache", seed=0)
    dataset.set_epoch(0)
    first = Sharding(2, 1, 1, World(), seed=0).indices(0, 0)[0]
    with torch.no_grad():
        expected = _loss(model, (dataset[first][None], [0]), 0, seed=0, device=torch.device("cpu"))["loss"]
    assert train_losses(out)[1] == pytest.approx(expected.item(), rel=1e-5)
    assert train_losses(out)[1] < train_losses(reference_run)[1]  # trained weights reconstruct better than new ones
