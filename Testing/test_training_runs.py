"""The training panel's logic (MiMPretrainLib.training_settings, training_runs, training_panel) on real detached
`mim3d pretrain` / `mim3d finetune` workers: settings become the exact command lines, a launched run is watched
through its folder while its metrics arrive, stopped with its STOP file, resumed and finished; a fresh watcher
re-attaches; bad input and a killed worker read as failed; a finished fine-tuning run is installed as a model, and a
pre-training run's checkpoint starts a fine-tuning run's encoder.

Models are the tiny MiM / mim-unetr networks of test_pretrain and test_finetune (one block per stage, 32³ inputs), so
a pre-training step takes a fraction of a second after the worker's start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_finetune import LABEL_MAP, write_cases

import MiMPretrainLib
from mim3d import registry
from mim3d.__main__ import COMMANDS, main
from mim3d.errors import BadInputError
from mim3d.protocol import parse_line
from mim3d.runs import RunDir, read_metrics, write_json_atomic
from MiMPretrainLib.training_panel import (
    DEBOUNCE_MS,
    LatestCheck,
    StartView,
    TrainingPanel,
    TrainingState,
    TrainingView,
)
from MiMPretrainLib.training_runs import (
    RunSnapshot,
    RunWatcher,
    launch_dir,
    list_recent_runs,
    pretrained_checkpoint,
    read_launch,
    register_model,
    resume_run,
    start_run,
    stop_run,
    tail_lines,
)
from MiMPretrainLib.training_settings import (
    METHOD_NOTES,
    NO_GPU_ESTIMATE,
    FinetuneSettings,
    PretrainSettings,
    estimate_time,
    label_names,
    plan_args,
    preview_args,
    summarize_preview,
)
from MiMSegmentationLib.worker import WorkerJob, worker_command, worker_env
from MiMSegmentationLib.worker import launch as worker_launch


def pretrain_lib_env() -> dict[str, str]:
    """worker_env() with MiMPretrainLib importable too (Slicer puts both module folders on sys.path)."""
    env = worker_env()
    env["PYTHONPATH"] = os.pathsep.join([str(Path(MiMPretrainLib.__file__).parent.parent), env["PYTHONPATH"]])
    return env


TIMEOUT_S = 120
MIM_TINY = {"input_size": 32, "embed_dims": [6, 12, 24, 48], "depths": [1, 1, 1, 1], "num_heads": 4, "decoder_dim": 24,
            "decoder_depth": 1, "decoder_heads": 4, "level2_count": 1, "level3_count": 1}
NET_TINY = {"embed_dims": [6, 12, 24, 48], "depths": [1, 1, 1, 1], "num_heads": 4}  # the mim-unetr of that encoder
TABLE = {"labels": [{"value": 1, "name": "liver"}, {"value": 2, "name": "spleen"}]}
LOSS_TERMS = ["alignment_level1_2", "alignment_level2_3", "loss", "reconstruction_level1", "reconstruction_level2",
              "reconstruction_level3"]


def write_scans(folder: Path, count: int) -> Path:
    """`count` smooth 40×48×48 CT-like volumes (int16 HU, 1.5×1.5×2 mm) as .nii.gz."""
    folder.mkdir(parents=True, exist_ok=True)
    z, y, x = np.mgrid[:40, :48, :48].astype(float)
    for i in range(count):
        image = sitk.GetImageFromArray((600 * np.sin(x / 5 + i) * np.cos(y / 7) + 300 * np.sin(z / 4)).astype(np.int16))
        image.SetSpacing((1.5, 1.5, 2.0))
        sitk.WriteImage(image, str(folder / f"scan{i}.nii.gz"))
    return folder


def pretrain_settings(data: Path, out: Path, cache: Path, **changes) -> PretrainSettings:
    values = dict(data=(str(data),), out=str(out), method="mim", preset="small", epochs=50, blr=0.5,
                  device="cpu", workers=0, cache=str(cache), override=MIM_TINY, max_steps=16, log_every=1)
    return PretrainSettings(**{**values, **changes})


def watch(watcher: RunWatcher, until, panel: TrainingPanel | None = None, what: str = "") -> list[RunSnapshot]:
    """Refresh every 50 ms until `until(snapshot)`; every snapshot seen. Fails after TIMEOUT_S with the last one."""
    seen, deadline = [], time.monotonic() + TIMEOUT_S
    while True:
        snapshot = watcher.refresh()
        seen.append(snapshot)
        if panel is not None:
            panel.update(snapshot)
        if until(snapshot):
            return seen
        if time.monotonic() > deadline:
            pytest.fail(f"waited {TIMEOUT_S} s for {what}; last: {snapshot.state} {snapshot.message!r}\n"
                        + "\n".join(snapshot.log_tail))
        time.sleep(0.05)


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """The pids of the workers this module starts; those still running (their command line names this session's
    temporary folder) are killed with their group at the end: a failed test must not leave a detached worker."""
    pids: list[int] = []
    yield pids
    ours = str(tmp_path_factory.getbasetemp()).encode()
    for pid in pids:
        with contextlib.suppress(OSError):
            if ours in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    return write_scans(tmp_path_factory.mktemp("scans"), 2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


# ---- a pre-training run from the panel: start, watch, stop, resume, finish -----------------------------------------

@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory, scans, cache, workers) -> dict:
    """One run as the panel drives it; what the watcher and the panel showed at each point."""
    out = tmp_path_factory.mktemp("runs") / "mim-1"
    settings = pretrain_settings(scans, out, cache)
    assert settings.check() == []
    panel, watcher, seen = TrainingPanel(), RunWatcher(out), {}
    pid = start_run("pretrain", settings.to_args(), out)
    workers.append(pid)
    panel.started(str(out))
    seen["after_start"] = (panel.view(), panel.start_view(settings.check()))
    seen["first"] = watch(watcher, lambda s: len(s.series.get("loss", ((), ()))[0]) >= 3, panel, "3 logged steps")

    os.kill(pid, signal.SIGSTOP)  # the run must not reach its end before the stop request lands
    try:
        seen["stop_requested"] = stop_run(out)
        panel.stop_requested()
        seen["while_stopping"] = (panel.update(watcher.refresh()), panel.view(), panel.start_view(settings.check()))
    finally:
        os.kill(pid, signal.SIGCONT)
    seen["stopping"] = watch(watcher, lambda s: s.state == "stopped" and not s.alive, panel, "the stop")
    seen["stopped_view"] = (panel.view(), panel.start_view(settings.check()))
    seen["stopped_problems"] = settings.check()

    workers.append(resume_run(out))
    panel.started(str(out))
    seen["resumed"] = watch(watcher, lambda s: s.state == "finished" and not s.alive, panel, "the resumed run to end")
    seen["finished_view"] = panel.view()
    seen["watcher"], seen["out"], seen["pid"] = watcher, out, pid
    return seen


def test_watcher_sees_the_launch_start_and_the_metrics_arrive_in_order(lifecycle):
    view, start = lifecycle["after_start"]
    assert view.state is TrainingState.STARTING
    assert not start.enabled and view.stop_enabled
    first = lifecycle["first"]
    states = [s.state for s in first]
    assert states[0] == "starting" and states[-1] == "running", states
    assert states == sorted(states, key=["starting", "running"].index)
    steps = [s.series.get("loss", ((), ()))[0] for s in first]
    assert len(set(steps)) >= 3, "the metrics did not arrive over several refreshes"
    for before, after in zip(steps, steps[1:], strict=False):
        assert after[:len(before)] == before  # each refresh only adds points
    assert steps[-1] == tuple(float(n) for n in range(1, len(steps[-1]) + 1))
    assert sorted(first[-1].series) == LOSS_TERMS  # every loss term, nothing of lr / samples_per_second / epoch
    running = first[-1]
    assert (running.command, running.alive, running.epochs, running.total_steps) == ("pretrain", True, 50, 16)
    assert running.fraction == running.step / 16


def test_stop_file_stops_the_run_after_its_step_and_the_panel_offers_resume(lifecycle):
    assert lifecycle["stop_requested"] is True
    state, view, start = lifecycle["while_stopping"]
    assert state is TrainingState.STOPPING  # although status.json still says running
    assert (view.stop_enabled, view.resume_enabled, start.enabled) == (False, False, False)
    assert view.status.startswith("stopping after the current step · epoch ")
    stopped = lifecycle["stopping"][-1]
    assert 3 <= stopped.step < 16 and stopped.last_checkpoint == str(lifecycle["out"] / "checkpoints" / "last.pt")
    assert stopped.message.startswith(f"stopped at step {stopped.step} (STOP file found)")
    view, start = lifecycle["stopped_view"]
    assert view.state is TrainingState.STOPPED and view.resume_enabled and not view.stop_enabled
    assert view.status == (f"stopped · epoch {stopped.epoch}/50 · step {stopped.step}/16 · Resume continues it")
    assert not start.enabled  # the output folder now holds this run
    assert lifecycle["stopped_problems"] == [f"{lifecycle['out']} already holds a run (stopped); resume it, or choose "
                                             "another folder for the new run."]


def test_resumed_run_finishes_and_the_same_watcher_has_every_step_once(lifecycle):
    resumed = lifecycle["resumed"]
    assert resumed[0].state == "starting"  # the old status said "stopped": the launch is newer
    finished = resumed[-1]
    assert (finished.state, finished.step, finished.fraction, finished.alive) == ("finished", 16, 1.0, False)
    assert finished.message == "reached --max-steps 16 of the 100 scheduled steps"
    entries = [e for e in read_metrics(lifecycle["out"]) if e["kind"] == "train"]
    assert finished.series["loss"] == (tuple(float(e["step"]) for e in entries), tuple(e["loss"] for e in entries))
    assert finished.series["loss"][0] == tuple(float(n) for n in range(1, 17))
    assert lifecycle["watcher"].metrics_lines == len(read_metrics(lifecycle["out"]))
    view = lifecycle["finished_view"]
    assert (view.state, view.progress, view.resume_enabled, view.use_enabled) == (TrainingState.FINISHED, 100, False,
                                                                                  False)
    assert view.status == "finished · epoch 8/50 · step 16/16"
    assert "step 16/16" in "\n".join(finished.log_tail)


def test_fresh_watcher_reattaches_to_the_finished_run_with_its_whole_series(lifecycle):
    again = RunWatcher(lifecycle["out"]).refresh()  # as after a Slicer restart
    last = lifecycle["resumed"][-1]
    assert again.series == last.series and again.state == "finished" and again.step == 16
    panel = TrainingPanel()
    assert panel.update(again) is TrainingState.FINISHED and panel.start_view([]).enabled
    recent = list_recent_runs([lifecycle["out"].parent, lifecycle["out"].parent / "absent"])
    assert [(r.run_dir, r.command, r.state, r.alive) for r in recent] == [(str(lifecycle["out"]), "pretrain",
                                                                           "finished", False)]


def test_pretrained_checkpoint_of_a_pretraining_run_is_its_last_checkpoint(lifecycle):
    assert pretrained_checkpoint(lifecycle["out"]) == lifecycle["out"] / "checkpoints" / "last.pt"


# ---- failures --------------------------------------------------------------------------------------------------------

def test_launch_with_an_empty_data_folder_reads_as_failed_with_the_workers_message(tmp_path, cache, workers):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "runs" / "bad"
    workers.append(start_run("pretrain", pretrain_settings(tmp_path / "empty", out, cache).to_args(), out))
    panel = TrainingPanel()
    panel.started(str(out))
    failed = watch(RunWatcher(out), lambda s: s.state == "failed", panel, "the launch to fail")[-1]
    assert failed.message == (f"{tmp_path / 'empty'}: no usable volume found (searched recursively for .nii, .nii.gz, "
                              ".nrrd, .mha, .mhd files and DICOM series).")
    assert not failed.alive and not out.exists() and failed.command == "pretrain"
    assert any("no usable volume found" in line for line in failed.log_tail)  # the worker's stderr
    view = panel.view()
    assert (view.state, view.error, view.resume_enabled) == (TrainingState.FAILED, failed.message, False)
    assert view.status == "failed before the run began" and panel.start_view([]).enabled
    deadline = time.monotonic() + 10
    while (code := read_launch(out)["returncode"]) is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the launching process records the exit code once it has reaped the worker
    assert code == 2


def test_run_outlives_the_process_that_launched_it_and_a_kill_reads_as_failed(tmp_path, scans, cache, workers):
    out = tmp_path / "runs" / "killed"
    settings = pretrain_settings(scans, out, cache, max_steps=400)
    code = ("import sys; from MiMPretrainLib.training_runs import start_run; "
            f"print(start_run('pretrain', sys.argv[1:], {str(out)!r}))")
    launcher = subprocess.run([sys.executable, "-c", code, *settings.to_args()], capture_output=True, text=True,
                              env=pretrain_lib_env(), timeout=TIMEOUT_S)  # as Slicer closed right after Start
    assert launcher.returncode == 0, launcher.stderr
    pid = int(launcher.stdout)
    workers.append(pid)
    watcher, panel = RunWatcher(out), TrainingPanel()
    panel.started(str(out))
    running = watch(watcher, lambda s: s.last_checkpoint is not None, panel, "the first checkpoint")[-1]
    assert (running.state, running.alive) == ("running", True)
    os.kill(pid, signal.SIGKILL)
    failed = watch(watcher, lambda s: s.state == "failed", panel, "the kill to show")[-1]
    assert not failed.alive and failed.message.startswith(f"the process ({pid}) ended while the run was")
    assert read_launch(out)["returncode"] is None  # its launcher was gone: nobody saw the exit code
    view = panel.view()
    assert view.state is TrainingState.FAILED and view.error == failed.message
    assert view.resume_enabled and not view.stop_enabled
    assert stop_run(out) is False  # nothing left to stop


def test_stop_before_the_run_began_ends_the_worker_and_reads_stopped(tmp_path, scans, cache, workers):
    out = tmp_path / "runs" / "early"
    workers.append(start_run("pretrain", pretrain_settings(scans, out, cache).to_args(), out))
    panel = TrainingPanel()
    panel.started(str(out))
    assert stop_run(out) is True  # still importing: no status.json, no stop handling yet
    panel.stop_requested()
    stopped = watch(RunWatcher(out), lambda s: s.state == "stopped" and not s.alive, panel, "the early stop")[-1]
    assert stopped.message == "stopped before the run began (nothing was written)" and not out.exists()
    assert read_launch(out)["stop_requested"] is True
    view = panel.view()
    assert (view.state, view.resume_enabled, panel.start_view([]).enabled) == (TrainingState.STOPPED, False, True)
    assert view.status == "stopped before the run began (nothing was written)"


# ---- fine-tuning from the pre-trained encoder, and the model it makes ------------------------------------------------

@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory, lifecycle, cache, example_ct_sm_path, example_seg_path, workers) -> dict:
    data = tmp_path_factory.mktemp("cases")
    for sub, source in (("images", example_ct_sm_path), ("labels", example_seg_path)):
        (data / sub).mkdir()
        shutil.copy(source, data / sub / "ct.nii.gz")
    (data / "labels.json").write_text(json.dumps(TABLE), encoding="utf-8")
    encoder = pretrained_checkpoint(lifecycle["out"])
    out = tmp_path_factory.mktemp("runs") / "Liver run 1"
    settings = FinetuneSettings(out=str(out), images=str(data / "images"), labels=str(data / "labels"),
                                label_table=str(data / "labels.json"), label_map='{"5": 1, "1": 2}',
                                pretrained=str(encoder), preset="small", override=NET_TINY, roi=(64, 64, 32),
                                spacing=(6.0,), samples_per_volume=1, epochs=3, val_every=1, lr=3e-3, device="cpu",
                                workers=0, cache=str(cache), log_every=1, crops="classes",
                                keep_largest=label_names(" liver, "))
    assert settings.check() == []
    workers.append(start_run("finetune", settings.to_args(), out))
    panel = TrainingPanel()
    panel.started(str(out))
    snapshot = watch(RunWatcher(out), lambda s: s.state in ("finished", "failed") and not s.alive, panel,
                     "fine-tuning")[-1]
    return {"out": out, "snapshot": snapshot, "panel": panel, "encoder": encoder}


def test_finetuning_starts_from_the_pretrained_checkpoint_and_plots_loss_and_dice(finetune_run):
    out, snapshot = finetune_run["out"], finetune_run["snapshot"]
    assert (snapshot.state, snapshot.command, snapshot.step) == ("finished", "finetune", 3), snapshot.message
    pretrained = json.loads((out / "config.json").read_text(encoding="utf-8"))["pretrained"]
    assert pretrained["checkpoint"] == str(finetune_run["encoder"]) and pretrained["method"] == "mim"
    validations = [e for e in read_metrics(out) if e["kind"] == "validation"]
    assert sorted(snapshot.series) == ["dice/liver", "dice/spleen", "loss", "mean_dice"]
    assert snapshot.series["loss"][0] == (1.0, 2.0, 3.0)
    for name in ("liver", "spleen"):
        assert snapshot.series[f"dice/{name}"] == ((1.0, 2.0, 3.0), tuple(v["dice"][name] for v in validations))
    assert snapshot.best_mean_dice == max(v["mean_dice"] for v in validations)
    assert snapshot.model_package == str(out / "model")


def test_the_panels_crop_centres_and_labels_kept_in_one_piece_reach_the_run_and_its_model(finetune_run):
    from mim3d.package import read_model_json

    out = finetune_run["out"]
    options = json.loads((out / "config.json").read_text(encoding="utf-8"))["options"]
    assert (options["crops"], options["keep_largest"]) == ("classes", ["liver"])
    assert read_model_json(out / "model").inference["keep_largest"] == ["liver"]
    assert label_names("liver, right kidney ,") == ("liver", "right kidney") and label_names(" ") is None


def test_finished_finetuning_run_is_installed_and_listed_by_the_registry(finetune_run, mim3d_home):
    panel = finetune_run["panel"]
    assert panel.view().use_enabled
    installed = register_model(finetune_run["out"])
    assert installed == mim3d_home / "models" / "liver-run-1"
    assert [m.id for m in registry.list_installed()] == ["liver-run-1"]
    assert registry.verify("liver-run-1").labels.names == ("liver", "spleen")
    panel.model_registered("liver-run-1")
    view = panel.view()
    assert not view.use_enabled and view.status.endswith(" · installed as model 'liver-run-1'")
    with pytest.raises(BadInputError, match="already installed"):
        register_model(finetune_run["out"])


def test_runs_that_cannot_be_reused_are_refused_with_the_reason(finetune_run, lifecycle, tmp_path):
    with pytest.raises(BadInputError, match="a fine-tuning run; choose the folder of a pre-training run"):
        pretrained_checkpoint(finetune_run["out"])
    with pytest.raises(BadInputError, match="a pretrain run; only a fine-tuning run has a model"):
        register_model(lifecycle["out"], home=tmp_path)
    with pytest.raises(BadInputError, match="not a mim3d run"):
        pretrained_checkpoint(tmp_path)


# ---- settings -> command lines ---------------------------------------------------------------------------------------

def parse(command: str, args: list[str]) -> argparse.Namespace:
    """`args` through the worker's own argparse parser for `command`."""
    parser = argparse.ArgumentParser(exit_on_error=False)
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    return parser.parse_args(args)


@pytest.mark.parametrize("amp", [None, True, False])
def test_pretrain_settings_become_the_options_the_worker_resolves(amp, tmp_path):
    from mim3d.run_options import PretrainOptions, resolve

    settings = PretrainSettings(data=(str(tmp_path / "a"), str(tmp_path / "b")), out=str(tmp_path / "run"),
                                method="simmim", preset="small", epochs=7, batch_size=2, blr=1.5e-4, amp=amp,
                                device="cuda", workers=0, cache=str(tmp_path / "cache"), init=str(tmp_path / "w.pt"),
                                override={"num_layers": 2, "mask_ratio": 0.6}, max_steps=5, log_every=3)
    parsed, resume = resolve(PretrainOptions, parse("pretrain", settings.to_args()))
    assert resume is None
    assert parsed.to_dict() == settings.completed().to_dict()  # the panel's dataclass is what the worker runs
    opts = parsed.to_dict()
    assert opts == {**PretrainOptions().to_dict(), "data": [str(tmp_path / "a"), str(tmp_path / "b")],
                    "out": str(tmp_path / "run"), "method": "simmim", "preset": "small",
                    "override": {"num_layers": 2, "mask_ratio": 0.6}, "epochs": 7, "batch_size": 2, "blr": 1.5e-4,
                    "warmup_epochs": 0.35000000000000003, "device": "cuda", "amp": amp, "workers": 0,
                    "cache": str(tmp_path / "cache"), "init": str(tmp_path / "w.pt"), "max_steps": 5, "log_every": 3}


def test_finetune_settings_become_the_options_the_worker_resolves(tmp_path):
    from mim3d.run_options import FinetuneOptions, resolve

    settings = FinetuneSettings(out=str(tmp_path / "run"), images=str(tmp_path / "im"), labels=str(tmp_path / "lb"),
                                label_table=str(tmp_path / "t.json"), label_map='{"5": 1}',
                                pretrained=str(tmp_path / "enc"), arch="unetr", preset="small", epochs=9,
                                batch_size=1, lr=2e-4, device="cpu", workers=1, roi=(64, 64, 32), spacing=(6.0,),
                                samples_per_volume=2, val_every=3, val_fraction=0.25, override={"feature_size": 4})
    parsed, _ = resolve(FinetuneOptions, parse("finetune", settings.to_args()))
    assert parsed.to_dict() == settings.completed().to_dict()  # the panel's dataclass is what the worker runs
    opts = parsed.to_dict()
    assert {k: opts[k] for k in ("images", "labels", "label_table", "label_map", "pretrained", "arch", "preset",
                                 "epochs", "lr", "device", "workers", "roi", "spacing", "samples_per_volume",
                                 "val_every", "val_fraction", "override", "dataset", "segmentations", "amp")} == {
        "images": str(tmp_path / "im"), "labels": str(tmp_path / "lb"), "label_table": str(tmp_path / "t.json"),
        "label_map": {"5": 1}, "pretrained": str(tmp_path / "enc"), "arch": "unetr", "preset": "small", "epochs": 9,
        "lr": 2e-4, "device": "cpu", "workers": 1, "roi": [64, 64, 32], "spacing": [6.0, 6.0, 6.0],
        "samples_per_volume": 2, "val_every": 3, "val_fraction": 0.25, "override": {"feature_size": 4},
        "dataset": None, "segmentations": None, "amp": None}
    dataset = FinetuneSettings(out=str(tmp_path / "r2"), dataset=str(tmp_path / "dataset.json"))
    assert parse("finetune", dataset.to_args()).dataset == str(tmp_path / "dataset.json")
    assert parse("pretrain", ["--resume", str(tmp_path / "run")]).resume == str(tmp_path / "run")


def test_settings_problems_are_listed_in_plain_words(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x", encoding="utf-8")
    settings = PretrainSettings(data=(str(tmp_path / "nope"),), out=str(tmp_path / "full"), method="byol",
                                epochs=0, init=str(tmp_path / "w.pt"))
    assert settings.check() == [
        f"The scan folder {tmp_path / 'nope'} does not exist.", "Unknown method 'byol'; choose mim, mae, simmim.",
        "Epochs must be at least 1 (it is 0).",
        f"{tmp_path / 'full'} exists and is not an empty folder; choose a new folder for the run.",
        f"The starting weights {tmp_path / 'w.pt'} are not a file."]
    assert PretrainSettings(data=(), out="").check() == ["Choose at least one folder of scans.",
                                                                 "Choose a folder for the new run."]
    both = FinetuneSettings(out=str(tmp_path / "new"), images=str(tmp_path), dataset=str(tmp_path / "d.json"))
    assert both.check() == ["Choose one source of labelled cases: images and labels folders, a dataset.json, or a "
                            "folder of segmentations (now: images and labels folders and a dataset.json)."]
    no_table = FinetuneSettings(out=str(tmp_path / "new"), images=str(tmp_path), labels=str(tmp_path / "lb"))
    assert no_table.check() == [f"The labels folder {tmp_path / 'lb'} does not exist.",
                                "Choose a label table (labels.json): label maps carry no names."]


def test_pretrained_encoder_setting_is_checked_against_the_run_it_names(tmp_path):
    def run_folder(name: str, command: str, method: str | None = None, checkpoint: bool = True) -> Path:
        folder = tmp_path / name
        (folder / "checkpoints").mkdir(parents=True)
        write_json_atomic(RunDir(folder).config, {"command": command, "model": {"method": method}})
        write_json_atomic(RunDir(folder).status, {"state": "finished"})
        if checkpoint:
            (folder / "checkpoints" / "last.pt").write_bytes(b"")
        return folder

    def problems(pretrained: Path, arch: str = "mim-unetr") -> list[str]:
        return FinetuneSettings(out=str(tmp_path / "new"), segmentations=str(tmp_path), pretrained=str(pretrained),
                                arch=arch).check()

    assert problems(run_folder("mim", "pretrain", "mim")) == []
    assert problems(run_folder("mae", "pretrain", "mae")) == [
        f"{tmp_path / 'mae'}: a mae pre-training run; its encoder fine-tunes with --arch unetr, not --arch mim-unetr."]
    assert problems(run_folder("ft", "finetune")) == [
        f"{tmp_path / 'ft'}: a fine-tuning run; choose the folder of a pre-training run, or a checkpoint file."]
    assert problems(run_folder("early", "pretrain", "simmim", checkpoint=False), "unetr") == [
        f"{tmp_path / 'early'}: the run has no checkpoints/last.pt yet (it has not finished an epoch)."]


# ---- the data preview (`mim3d pretrain --check-data`) ----------------------------------------------------------------

def test_preview_worker_reports_volumes_formats_spacings_and_skipped_files(tmp_path, scans):
    folder = tmp_path / "mixed"
    shutil.copytree(scans, folder)
    (folder / "liver.seg.nrrd").write_bytes(b"NRRD0004\n")
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(folder / "slice.nrrd"))
    before = sorted(tmp_path.rglob("*"))
    job = WorkerJob(worker_command("pretrain", preview_args([str(folder)])), env=worker_env({"MIM3D_HOME": str(
        tmp_path / "home")}))
    job.start()
    outcome = job.wait(TIMEOUT_S)
    assert outcome.ok, outcome.message
    assert outcome.result["folders"] == [str(folder)] and outcome.result["summary"]["count"] == 2
    assert summarize_preview(outcome.result) == (
        "2 volumes (nifti 2), 0.2 MB\n"
        "spacing 1.5×1.5×2 mm (median; from 1.5×1.5×2 to 1.5×1.5×2)\n"
        "2 files will be skipped:\n"
        f"  {folder / 'liver.seg.nrrd'}: is a segmentation (.seg.nrrd), not a scan\n"
        f"  {folder / 'slice.nrrd'}: is a 2-D image (size 8×8); a CT volume must be 3-D.")
    assert sorted(tmp_path.rglob("*")) == before  # no run folder, no cache, nothing written


def test_preview_of_a_folder_without_scans_is_the_workers_error(tmp_path, capsys):
    assert main(["pretrain", *preview_args([str(tmp_path)])]) == 2
    error = parse_line(capsys.readouterr().out.splitlines()[-1])
    assert summarize_preview(error) == (f"These folders cannot be used: {tmp_path}: no usable volume found (searched "
                                        "recursively for .nii, .nii.gz, .nrrd, .mha, .mhd files and DICOM series).")
    assert main(["pretrain", "--check-data", "--resume", str(tmp_path)]) == 2
    assert "does not go with --resume" in parse_line(capsys.readouterr().out.splitlines()[-1])["message"]
    assert main(["pretrain", "--check-data"]) == 2
    assert parse_line(capsys.readouterr().out.splitlines()[-1])["message"] == (
        "--check-data needs --data DIR (the folders of scans to check)")


# ---- the memory plan (`mim3d finetune|pretrain --check-plan`) and the checks that follow a form --------------------

def plan_check(command: str, args: list[str], capsys) -> tuple[int, dict]:
    """`mim3d COMMAND ARGS` in this process: its exit code and its one result event."""
    code = main([command, *args])
    results = [e for e in map(parse_line, capsys.readouterr().out.splitlines()) if e and e["type"] == "result"]
    assert len(results) == 1, results
    return code, results[0]


def test_finetune_plan_check_plans_the_panels_run_on_its_device_and_writes_nothing(tmp_path, capsys,
                                                                                   example_ct_sm_path,
                                                                                   example_seg_path):
    from mim3d.run_options import FinetuneOptions, resolve

    data = write_cases(tmp_path / "cases", example_ct_sm_path, example_seg_path)
    (tmp_path / "encoder.pt").write_bytes(b"")  # named, never read: the plan needs no weights
    planned = {}
    for mode in ("full", "frozen"):
        settings = FinetuneSettings(out=str(tmp_path / "run"), images=str(data / "images"),
                                    labels=str(data / "labels"), label_table=str(data / "labels.json"),
                                    label_map=LABEL_MAP, pretrained=str(tmp_path / "encoder.pt"), encoder=mode,
                                    preset="small", override=NET_TINY, roi=(64, 64, 32), device="cpu",
                                    cache=str(tmp_path / "cache"))
        args = plan_args(settings)
        parsed = parse("finetune", args)
        assert parsed.check_plan and resolve(FinetuneOptions, parsed)[0].to_dict() == settings.completed().to_dict()
        before = sorted(tmp_path.rglob("*"))
        code, planned[mode] = plan_check("finetune", args, capsys)
        assert sorted(tmp_path.rglob("*")) == before  # no run folder, no cache, nothing written
        assert code == 0 and planned[mode]["fits"] and planned[mode]["device"] == "cpu"
        assert planned[mode]["would_fit"] is None and planned[mode]["choices"] == {"activation_checkpointing": False}
        assert 0 < planned[mode]["estimate_bytes"] <= planned[mode]["budget_bytes"]
    assert planned["frozen"]["estimate_bytes"] < planned["full"]["estimate_bytes"]  # no encoder gradients or moments
    assert plan_args(FinetuneSettings(out=str(tmp_path / "run"))) is None  # no data source: nothing to plan yet


def test_pretrain_plan_check_plans_the_resumed_runs_options_and_leaves_its_folder_alone(tmp_path, capsys):
    from mim3d.run_options import PretrainOptions

    run = tmp_path / "run"
    saved = PretrainOptions(data=(str(tmp_path),), out=str(run), preset="small", override=MIM_TINY, batch_size=2,
                            device="cpu").completed()
    (run / "checkpoints").mkdir(parents=True)
    write_json_atomic(RunDir(run).config, {"command": "pretrain", "options": saved.to_dict()})
    write_json_atomic(RunDir(run).status, {"state": "stopped"})
    (run / "checkpoints" / "last.pt").write_bytes(b"")  # not read: the plan needs the options only
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    code, planned = plan_check("pretrain", ["--resume", str(run), "--check-plan"], capsys)
    assert code == 0 and planned["fits"] and planned["description"].startswith("plan: one step without activation")
    code, two = plan_check("pretrain", ["--resume", str(run), "--batch-size", "1", "--check-plan"], capsys)
    assert two["estimate_bytes"] < planned["estimate_bytes"]  # a resumed run may change its batch: planned as changed
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    assert main(["pretrain", "--resume", str(run), "--check-plan", "--check-data"]) == 2
    assert parse_line(capsys.readouterr().out.splitlines()[-1])["message"] == (
        "--check-data and --check-plan: give one of them (the scans found, or the memory plan)")


def test_a_form_check_runs_only_the_latest_settings_one_worker_at_a_time(tmp_path, scans):
    """LatestCheck on real `--check-data` workers, on a virtual clock: a request superseded within the debounce never
    starts; a newer one cancels the running worker and starts only once it has ended; only the latest answers."""
    clock, started, finished = VirtualClock(), [], []

    def launch(args, **options):
        assert all(p.poll() is not None for p in started), "a second check started while one was running"
        started.append(worker_launch(args, **options))
        return started[-1]

    check = LatestCheck(clock.schedule, finished.append, env=worker_env({"MIM3D_HOME": str(tmp_path / "home")}),
                        launch=launch)
    single = write_scans(tmp_path / "single", 1)
    check.request("pretrain", preview_args([str(tmp_path / "absent")]))
    check.request("pretrain", preview_args([str(scans)]))  # within the debounce: the first never starts
    clock.advance(DEBOUNCE_MS)
    assert len(started) == 1 and check.pending
    check.request("pretrain", preview_args([str(single)]))  # the running worker is cancelled, its answer dropped
    clock.run_until(lambda: finished, TIMEOUT_S)
    assert len(started) == 2 and started[0].returncode != 0
    assert [o.result["folders"] for o in finished] == [[str(single)]] and check.outcome is finished[0]
    check.request("pretrain", preview_args([str(single)]))  # the same settings again: nothing to do
    clock.advance(10 * DEBOUNCE_MS)
    assert len(started) == 2 and not check.pending
    check.request("pretrain", None)
    assert check.wanted is None and not check.pending


class VirtualClock:
    """`schedule(ms, fn)` on a virtual clock: `advance` runs what falls due in time order; `run_until` keeps going
    (the jobs' polls reschedule themselves) with a short real sleep between calls, so that the workers progress."""

    def __init__(self):
        self.now, self.queue, self.count = 0, [], 0

    def schedule(self, ms: int, fn) -> None:
        self.count += 1
        heapq.heappush(self.queue, (self.now + ms, self.count, fn))

    def advance(self, ms: int) -> None:
        end = self.now + ms
        while self.queue and self.queue[0][0] <= end:
            self.now, _, fn = heapq.heappop(self.queue)
            fn()
        self.now = end

    def run_until(self, condition, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert self.queue and time.monotonic() < deadline, "nothing left to run, or timed out"
            self.now, _, fn = heapq.heappop(self.queue)
            fn()
            time.sleep(0.005)


# ---- the watcher's reading, on hand-written run folders --------------------------------------------------------------

def test_watcher_reads_only_the_new_bytes_and_starts_over_when_resume_rewrites_the_metrics(tmp_path):
    metrics = RunDir(tmp_path).metrics
    metrics.write_text('{"kind": "train", "step": 1, "loss": 0.9, "lr": 0.1}\n{"kind": "train", "step": 2, "lo',
                       encoding="utf-8")
    watcher = RunWatcher(tmp_path)
    assert watcher.refresh().series == {"loss": ((1.0,), (0.9,))}
    with open(metrics, "r+b") as f:  # change bytes already read: a watcher that re-read the file would see 0.1
        f.write(b'{"kind": "train", "step": 1, "loss": 0.1')
    with open(metrics, "a", encoding="utf-8") as f:
        f.write('ss": 0.8}\n{"kind": "validation", "step": 2, "epoch": 1.0, "dice": {"liver": 0.5, "spleen": null}, '
                '"mean_dice": 0.5}\n')
    assert watcher.refresh().series == {"loss": ((1.0, 2.0), (0.9, 0.8)), "dice/liver": ((1.0,), (0.5,)),
                                        "mean_dice": ((1.0,), (0.5,))}
    assert watcher.metrics_lines == 3
    replacement = tmp_path / "new.jsonl"
    replacement.write_text('{"kind": "train", "step": 1, "loss": 0.7}\n', encoding="utf-8")
    os.replace(replacement, metrics)  # as --resume keeps the lines up to its checkpoint
    assert watcher.refresh().series == {"loss": ((1.0,), (0.7,))} and watcher.metrics_lines == 1


def test_log_tail_is_read_from_the_end_of_the_file(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("".join(f"line {n} " + "x" * 300 + "\n" for n in range(100)), encoding="utf-8")
    assert [line.split()[1] for line in tail_lines(log, 3)] == ["97", "98", "99"]
    assert [line.split()[1] for line in tail_lines(log, 5, max_bytes=1000)] == ["97", "98", "99"]
    assert tail_lines(tmp_path / "absent.txt", 3) == []
    assert RunWatcher(tmp_path, log_lines=2).refresh().log_tail == (f"line 98 {'x' * 300}", f"line 99 {'x' * 300}")


def test_folder_without_a_run_or_launch_reads_as_missing(tmp_path):
    snapshot = RunWatcher(tmp_path).refresh()
    assert (snapshot.state, snapshot.alive, snapshot.series, snapshot.command) == ("missing", False, {}, "")
    assert TrainingPanel().update(snapshot) is TrainingState.IDLE


# ---- the panel's states ----------------------------------------------------------------------------------------------

def snapshot(state: str, **fields) -> RunSnapshot:
    values = dict(run_dir="/runs/r", command="pretrain", state=state, alive=state in ("starting", "running",
                                                                                        "stopping"),
                  epoch=3, epochs=10, step=120, total_steps=400, fraction=0.3, eta_seconds=720.0, eta="12 min",
                  message="", last_checkpoint="/runs/r/checkpoints/last.pt", series={}, log_tail=(),
                  model_package=None, best_mean_dice=None, updated="")
    return RunSnapshot(**{**values, **fields})


def view_after(*snapshots: RunSnapshot, problems=(), stop=False) -> tuple[TrainingView, StartView]:
    panel = TrainingPanel()
    panel.started("/runs/r")
    if stop:
        panel.stop_requested()
    for s in snapshots:
        panel.update(s)
    return panel.view(), panel.start_view(list(problems))


def test_panel_view_in_each_state():
    idle, idle_start = TrainingPanel().view(), TrainingPanel().start_view(["Choose at least one folder of scans."])
    assert (idle.state, idle_start.enabled, idle_start.tooltip, idle.progress) == (
        TrainingState.IDLE, False, "Choose at least one folder of scans.", 0)
    assert TrainingPanel().start_view([]).enabled and idle.status.startswith("No run yet")  # not the form's problem

    starting, start = view_after(snapshot("starting", message="data: 2 volumes, 0 skipped", total_steps=0, step=0,
                                          fraction=0.0))
    assert (starting.state, starting.stop_enabled, start.enabled, starting.settings_enabled) == (
        TrainingState.STARTING, True, False, False)
    assert starting.status == "starting: data: 2 volumes, 0 skipped" and start.tooltip == "A run is starting."

    running, _ = view_after(snapshot("running"))
    assert (running.state, running.progress, running.status) == (TrainingState.RUNNING, 30,
                                                                  "epoch 3/10 · step 120/400 · ETA 12 min")
    assert running.stop_enabled and not running.resume_enabled and not running.use_enabled

    stopping, _ = view_after(snapshot("running"), stop=True)
    assert (stopping.state, stopping.stop_enabled) == (TrainingState.STOPPING, False)
    assert view_after(snapshot("stopping"))[0].state is TrainingState.STOPPING

    stopped, start = view_after(snapshot("stopped", alive=False), stop=True)
    assert (stopped.state, stopped.resume_enabled, start.enabled) == (TrainingState.STOPPED, True, True)
    assert not view_after(snapshot("stopped", last_checkpoint=None))[0].resume_enabled

    failed, _ = view_after(snapshot("failed", message="MemoryError: out of memory"))
    assert (failed.state, failed.error, failed.resume_enabled, failed.status) == (
        TrainingState.FAILED, "MemoryError: out of memory", True, "failed · epoch 3/10 · step 120/400")

    done, _ = view_after(snapshot("finished", command="finetune", model_package="/runs/r/model",
                                  best_mean_dice=0.8312, fraction=1.0, step=400, epoch=10))
    assert (done.state, done.progress, done.use_enabled, done.status) == (
        TrainingState.FINISHED, 100, True, "finished · epoch 10/10 · step 400/400 · best mean Dice 0.831")
    assert not view_after(snapshot("finished", fraction=1.0))[0].use_enabled  # pre-training: no model to segment with


def test_panel_refuses_a_second_start_while_a_run_is_active():
    panel = TrainingPanel()
    panel.started("/runs/r")
    with pytest.raises(RuntimeError, match="while one is starting"):
        panel.started("/runs/other")


# ---- method notes and time estimates ---------------------------------------------------------------------------------

def test_every_method_has_a_one_line_explanation():
    assert sorted(METHOD_NOTES) == ["mae", "mim", "simmim"]
    assert all("\n" not in note and note.endswith(".") for note in METHOD_NOTES.values())


def test_time_estimates_use_the_measured_cpu_step_times():
    base = PretrainSettings(data=("d",), out="o", method="mim", preset="base", epochs=100)
    assert estimate_time(base, 10, "cpu", cpu_count=2) == "about 17 h on this CPU"  # 1000 samples × 61.4 s
    assert estimate_time(base, 10, "cpu", cpu_count=8) == "about 8.5 h on this CPU"  # assumed √(8/2) = 2× faster
    assert estimate_time(base, 10, "cuda") == NO_GPU_ESTIMATE  # no GPU step time measured: no invented figure
    forced_cpu = PretrainSettings(data=("d",), out="o", epochs=100, device="cpu")
    assert estimate_time(forced_cpu, 10, "cuda", cpu_count=2) == "about 17 h on this CPU"
    mae = PretrainSettings(data=("d",), out="o", method="mae", preset="small", epochs=10, max_steps=100)
    assert estimate_time(mae, 1000, "cpu", cpu_count=2) == "about 6 s on this CPU"  # --max-steps 100 × 0.059 s
    assert estimate_time(PretrainSettings(data=("d",), out="o", batch_size=4), 3, "cpu") == (
        "no estimate: fewer volumes than one training step needs")
    small = FinetuneSettings(out="o", images="i", labels="l", preset="small", epochs=10, roi=(64,))
    assert estimate_time(small, 10, "cpu", cpu_count=2) == "about 11 min on this CPU"  # 8 cases × 10 × 8.5 s
    assert estimate_time(FinetuneSettings(out="o", images="i", labels="l", preset="small", epochs=10), 10, "cpu",
                         cpu_count=2) == "about 42 min on this CPU"  # 80 steps × 31.2 s at 96³
    assert estimate_time(FinetuneSettings(out="o", images="i", labels="l", epochs=10), 10, "cpu",
                         cpu_count=2) == "about 4.4 h on this CPU"  # base: assumed 6.4× small


def test_launch_files_sit_in_a_hidden_folder_beside_the_run():
    assert launch_dir("/data/runs/mim-1") == Path("/data/runs/.mim-1.launch")


def test_resuming_a_folder_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(BadInputError, match="not a mim3d training run"):
        resume_run(tmp_path)


def test_panel_modules_import_without_torch_numpy_or_simpleitk():
    code = ("import sys\nfor name in ('torch', 'numpy', 'SimpleITK', 'qt', 'slicer'): sys.modules[name] = None\n"
            "import MiMPretrainLib.training_panel, MiMPretrainLib.training_runs\n"
            "import MiMPretrainLib.training_settings\nprint('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=pretrain_lib_env())
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr
