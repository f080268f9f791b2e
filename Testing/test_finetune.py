"""`mim3d finetune` as users and the Slicer panel run it: real `python -m mim3d finetune` subprocesses on the real
example CT (TotalSegmentator's example_ct_sm and its labels), checked through the run folder, the model package and
the protocol events; bad input through the same entry point in this process; the Dice arithmetic and the split rules
directly.

Models are cut-down `small` mim-unetr networks (one block per stage, 6 or 12 base channels) on the CT resampled to
6 mm, where one 64×64×32 window holds the whole padded volume, so a step takes about a second on a CPU.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from volume_helpers import make_image, ramp, write_image

from mim3d.__main__ import main
from mim3d.errors import BadInputError
from mim3d.labels import LabelTable
from mim3d.protocol import parse_line
from mim3d.runs import read_metrics, read_status
from mim3d.training.finetune_data import split
from mim3d.training.validation import case_dice, summarize

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600
LABEL_MAP = '{"5": 1, "1": 2}'  # TotalSegmentator "total": 5 liver, 1 spleen -> this table's 1 liver, 2 spleen
TABLE = {"labels": [{"value": 1, "name": "liver"}, {"value": 2, "name": "spleen"}]}
NET = {"tiny": ["embed_dims=[6,12,24,48]", "depths=[1,1,1,1]", "num_heads=4"],
       "dice": ["embed_dims=[12,24,48,96]", "depths=[1,1,1,1]", "num_heads=4"]}
MIM_TINY = ["input_size=32", "embed_dims=[6,12,24,48]", "depths=[1,1,1,1]", "num_heads=4", "decoder_dim=24",
            "decoder_depth=1", "decoder_heads=4", "level2_count=1", "level3_count=1"]


def overrides(values: list[str]) -> list[str]:
    return [arg for value in values for arg in ("--override", value)]


def finetune_args(data: Path, out: Path, *extra: str, net: str = "tiny", epochs: int = 3,
                  lr: str = "3e-3") -> list[str]:
    """A run on the cases in data/images + data/labels, with the table data/labels.json and the TotalSegmentator map."""
    return ["--images", str(data / "images"), "--labels", str(data / "labels"), "--label-table",
            str(data / "labels.json"), "--label-map", LABEL_MAP, "--out", str(out), "--preset", "small",
            *overrides(NET[net]), "--roi", "64", "64", "32", "--spacing", "6", "--samples-per-volume", "1", "--epochs",
            str(epochs), "--lr", lr, "--workers", "0", "--log-every", "1", *extra]


def environment(home: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO / "MiMSegmentation"), "MIM3D_HOME": str(home)}


def mim3d(command: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "mim3d", command, *args]


def run(command: list[str], home: Path, stderr: Path | None = None) -> subprocess.CompletedProcess:
    with open(stderr or os.devnull, "w") as err:
        return subprocess.run(command, stdout=subprocess.PIPE, stderr=err, text=True, env=environment(home),
                              timeout=TIMEOUT_S)


def protocol_events(stdout: str) -> list[dict]:
    events = [parse_line(line) for line in stdout.splitlines()]
    assert None not in events, f"stdout holds a line that is not a protocol event:\n{stdout}"
    return events


def entries(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in read_metrics(run_dir) if e["kind"] == kind]


def write_cases(folder: Path, ct: Path, seg: Path, names=("ct",)) -> Path:
    """images/<name>.nii.gz + labels/<name>.nii.gz copies of the example CT and its labels, and labels.json."""
    for name in names:
        for sub, source in (("images", ct), ("labels", seg)):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(source, folder / sub / f"{name}.nii.gz")
    (folder / "labels.json").write_text(json.dumps(TABLE))
    return folder


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mim3d-home")  # one pre-processing cache for the module's runs


@pytest.fixture(scope="module")
def ct_data(tmp_path_factory, example_ct_sm_path, example_seg_path) -> Path:
    return write_cases(tmp_path_factory.mktemp("ct"), example_ct_sm_path, example_seg_path)


# ---- a run on the real CT -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dice_run(tmp_path_factory, ct_data, home) -> tuple[Path, subprocess.CompletedProcess]:
    """30 steps on the example CT, validated on it every 10 epochs, the liver cleaned by default: the run the package
    and Dice tests read."""
    out = tmp_path_factory.mktemp("dice") / "run"
    err = out.parent / "stderr.txt"
    done = run(mim3d("finetune", *finetune_args(ct_data, out, "--val-every", "10", "--keep-largest", "liver",
                                                net="dice", epochs=30)), home, err)
    assert done.returncode == 0, err.read_text()[-3000:]
    return out, done


def test_short_run_on_real_ct_reaches_a_liver_dice_well_above_chance(dice_run):
    out, done = dice_run
    validations = entries(out, "validation")
    assert [v["step"] for v in validations] == [10, 20, 30]
    assert validations[-1]["dice"]["liver"] > 0.5, validations  # an empty or random prediction scores about 0
    best = max(validations, key=lambda v: v["mean_dice"])
    status = read_status(out)
    assert (status["state"], status["best_step"], status["best_checkpoint"]) == ("finished", best["step"],
                                                                                  "checkpoints/best.pt")
    assert status["best_mean_dice"] == pytest.approx(best["mean_dice"])
    result = protocol_events(done.stdout)[-1]
    assert result["type"] == "result" and result["model_package"] == str(out / "model")
    assert result["best_dice"] == pytest.approx(best["dice"])
    dice_events = [e for e in protocol_events(done.stdout) if e["type"] == "metric" and "mean_dice" in e["values"]]
    assert [e["step"] for e in dice_events] == [10, 20, 30]


def test_run_folder_records_the_recipe_split_and_validation_curves(dice_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = dice_run
    config = json.loads((out / "config.json").read_text())
    assert config["command"] == "finetune" and config["model"]["num_classes"] == 3
    assert (config["data"]["train"], config["data"]["val"]) == (["ct"], ["ct"])
    assert "validated on the training case" in config["data"]["split"]
    plan = config["optimization"]
    assert (plan["lr"], plan["weight_decay"], plan["clip_grad"], plan["betas"]) == (3e-3, 1e-5, 5.0, [0.9, 0.999])
    assert (plan["steps_per_epoch"], plan["total_steps"], plan["warmup_steps"]) == (1, 30, 3)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "epoch-30.pt", "last.pt"]
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("validation/mean_dice")] == [10, 20, 30]
    assert events.Scalars("validation/dice_liver")[-1].value == pytest.approx(
        entries(out, "validation")[-1]["dice"]["liver"])


def test_run_exports_a_loadable_package_with_labels_preprocessing_and_provenance(dice_run, ct_data):
    from mim3d.package import load_package

    out, _ = dice_run
    model, info = load_package(out / "model")
    assert [(label.value, label.name) for label in info.labels] == [(1, "liver"), (2, "spleen")]
    assert info.architecture["arch"] == "mim-unetr" and info.architecture["num_classes"] == 3
    assert info.preprocessing == {"orientation": "RAS", "spacing_mm": [6.0, 6.0, 6.0],
                                  "intensity_window_hu": [-175.0, 250.0], "foreground_crop": True}
    assert info.inference == {"roi_size": [64, 64, 32], "overlap": 0.5, "blend": "gaussian", "keep_largest": ["liver"]}
    best = read_status(out)
    provenance = info.provenance
    assert provenance["pretrained_from"] is None
    assert provenance["trained_on"]["cases"] == ["ct"] and provenance["validated_on"]["cases"] == ["ct"]
    assert provenance["validation_dice"] == pytest.approx(best["best_dice"])
    assert (provenance["best_step"], provenance["steps_trained"], provenance["epochs_trained"]) == (
        best["best_step"], 30, 30)
    best_weights = torch.load(out / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(tensor, best_weights[name]) for name, tensor in model.state_dict().items())


def test_package_reproduces_its_validation_dice_computed_independently(dice_run, ct_data, home):
    from monai.inferers import sliding_window_inference

    from mim3d.data import cases_from_folders
    from mim3d.data.transforms import FinetunePreprocessing, finetune_val_dataset
    from mim3d.package import load_package

    out, _ = dice_run
    model, info = load_package(out / "model")
    case = cases_from_folders(ct_data / "images", ct_data / "labels")[0]
    case = type(case)(case.image, case.label, case.name, {5: 1, 1: 2})
    settings = FinetunePreprocessing(spacing_mm=(6.0,) * 3, roi=info.roi_size)
    item = finetune_val_dataset([case], settings, home / "cache")[0]
    with torch.no_grad():
        logits = sliding_window_inference(item["image"].as_tensor()[None], info.roi_size, 1, model, overlap=0.5,
                                          mode="gaussian")
    predicted, reference = logits.argmax(1)[0].numpy() == 1, item["label"].as_tensor()[0].numpy() == 1
    liver = 2 * np.sum(predicted & reference) / (np.sum(predicted) + np.sum(reference))
    assert liver == pytest.approx(info.provenance["validation_dice"]["liver"], abs=1e-4)


def test_mim3d_segment_with_the_exported_package_finds_the_liver_on_the_input_grid(dice_run, example_ct_sm_path,
                                                                                    example_seg_path, home, tmp_path):
    import SimpleITK as sitk

    out, _ = dice_run
    output = tmp_path / "ct.seg.nrrd"
    done = run(mim3d("segment", str(example_ct_sm_path), "--model", str(out / "model"), "--output", str(output)), home)
    assert done.returncode == 0, done.stderr[-2000:]
    ct, labels = sitk.ReadImage(str(example_ct_sm_path)), sitk.ReadImage(str(output))
    assert (labels.GetSize(), labels.GetSpacing(), labels.GetOrigin()) == (ct.GetSize(), ct.GetSpacing(),
                                                                           ct.GetOrigin())
    predicted = sitk.GetArrayFromImage(labels) == 1
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(example_seg_path))) == 5  # TotalSegmentator's liver id
    liver = 2 * np.sum(predicted & reference) / (np.sum(predicted) + np.sum(reference))
    assert liver > 0.6, liver  # trained on this scan for 30 steps at 6 mm; a random prediction scores about 0
    pieces = sitk.ConnectedComponentImageFilter()
    pieces.Execute(sitk.GetImageFromArray(predicted.astype(np.uint8)))
    assert pieces.GetObjectCount() == 1  # the package's --keep-largest liver, with no option given to segment


# ---- --pretrained ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory, ct_data, home) -> Path:
    """A one-step `mim3d pretrain` MiM run (tiny encoder, 32³ inputs) on the example CT."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    done = run(mim3d("pretrain", "--data", str(ct_data / "images"), "--method", "mim", "--preset", "small",
                     *overrides(MIM_TINY), "--epochs", "1", "--workers", "0", "--out", str(out)), home)
    assert done.returncode == 0
    return out


def test_pretrained_run_folder_starts_the_encoder_from_its_final_weights(pretrain_run, ct_data, home, tmp_path):
    out = tmp_path / "run"
    # lr 0: the one step leaves every weight where loading put it
    done = run(mim3d("finetune", *finetune_args(ct_data, out, "--pretrained", str(pretrain_run), "--max-steps", "1",
                                                epochs=1, lr="0")), home)
    assert done.returncode == 0
    pretrained = json.loads((out / "config.json").read_text())["pretrained"]
    assert pretrained["checkpoint"] == str(pretrain_run / "checkpoints" / "last.pt")
    assert pretrained["method"] == "mim" and pretrained["loaded"] > 0
    assert pretrained["adapted"] == ["backbone.pos_embed interpolated from the 2×2×2 to the 4×4×2 token grid"]
    assert f"pre-trained: {pretrained['summary']}" in (out / "log.txt").read_text()
    source = torch.load(pretrain_run / "checkpoints" / "last.pt", weights_only=True)["model"]
    tuned = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    encoder = [k for k in source if re.match(r"(patch_embed[1-5]|blocks[1-4])\.", k)]
    assert len(encoder) == pretrained["loaded"] - 1  # all but pos_embed, which was interpolated
    assert all(torch.equal(tuned["backbone." + k], source[k]) for k in encoder)
    assert json.loads((out / "model" / "model.json").read_text())["provenance"]["pretrained_from"] == str(
        pretrain_run)


# ---- stop and resume ------------------------------------------------------------------------------------------------

def resume_args(data: Path, out: Path) -> list[str]:
    """Two training cases (copies of the CT: 2 steps per epoch) and a validation case, validated every epoch."""
    return finetune_args(data, out, "--val-cases", "c", "--val-every", "1", epochs=2)


@pytest.fixture(scope="module")
def three_cases(tmp_path_factory, example_ct_sm_path, example_seg_path) -> Path:
    return write_cases(tmp_path_factory.mktemp("three"), example_ct_sm_path, example_seg_path, names=("a", "b", "c"))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, three_cases, home) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run(mim3d("finetune", *resume_args(three_cases, out)), home).returncode == 0
    return out


def train_losses(run_dir: Path) -> dict[int, float]:
    steps = [e["step"] for e in entries(run_dir, "train")]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {e["step"]: e["loss"] for e in entries(run_dir, "train")}


def stop_after_first_step(args: list[str], out: Path, home: Path) -> None:
    """Run `mim3d finetune ARGS` and ask it to stop (out/STOP) once it has logged a step; it must exit 0."""
    process = subprocess.Popen(mim3d("finetune", *args), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=environment(home))
    try:
        for line in process.stdout:
            event = parse_line(line)
            if event and event["type"] == "metric" and event["step"] >= 1:
                (out / "STOP").touch()
                break
        process.stdout.read()
        assert process.wait(TIMEOUT_S) == 0
    finally:
        process.kill()
        process.wait()


def test_stopped_run_resumes_to_the_losses_and_dice_of_an_uninterrupted_run(three_cases, home, reference_run,
                                                                            tmp_path):
    out = tmp_path / "run"
    stop_after_first_step(resume_args(three_cases, out), out, home)
    status = read_status(out)
    assert status["state"] == "stopped" and 1 <= status["step"] < 4, status

    resumed = run(mim3d("finetune", "--resume", str(out)), home)
    assert resumed.returncode == 0
    assert protocol_events(resumed.stdout)[-1]["state"] == "finished"
    assert list(train_losses(out)) == list(range(1, 5))
    assert train_losses(out) == pytest.approx(train_losses(reference_run), rel=1e-5)
    reference = entries(reference_run, "validation")
    assert [v["step"] for v in entries(out, "validation")] == [v["step"] for v in reference] == [2, 4]
    assert [v["mean_dice"] for v in entries(out, "validation")] == pytest.approx([v["mean_dice"] for v in reference],
                                                                                 rel=1e-4)
    assert (out / "model" / "model.json").exists()


def test_resume_refuses_an_option_that_would_change_the_run(reference_run, capsys):
    message = bad_input(["--resume", str(reference_run), "--lr", "1e-2"], capsys)
    assert "--lr 0.01 (the run has 0.003)" in message


# ---- bad input: exit 2, a message naming the file, and no run folder -----------------------------------------------

def bad_input(argv: list[str], capsys) -> str:
    """Run the CLI in this process; it must answer exit 2 with a bad_input event; returns the message."""
    assert main(["finetune", *argv]) == 2
    error = protocol_events(capsys.readouterr().out)[-1]
    assert error["type"] == "error" and error["kind"] == "bad_input"
    return error["message"]


def synthetic_cases(folder: Path, labels: dict[str, np.ndarray | None], label_grid: dict | None = None) -> Path:
    """images/<name>.nii.gz (16×24×32 ramps, 2 mm) with labels/<name>.nii.gz when the label array is given."""
    for name, label in labels.items():
        write_image(folder / "images" / f"{name}.nii.gz", make_image(ramp((16, 24, 32)), spacing=(2, 2, 2)))
        if label is not None:
            write_image(folder / "labels" / f"{name}.nii.gz", make_image(label, **(label_grid or {"spacing": (2, 2,
                                                                                                             2)})))
    (folder / "labels").mkdir(exist_ok=True)
    (folder / "labels.json").write_text(json.dumps(TABLE))
    return folder


def blob(shape=(16, 24, 32), value: int = 1) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    label[4:10, 6:16, 8:20] = value
    return label


def synthetic_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--images", str(data / "images"), "--labels", str(data / "labels"), "--label-table",
            str(data / "labels.json"), "--out", str(out), "--preset", "small", "--workers", "0", *extra]


@pytest.fixture
def isolated_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MIM3D_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_images_without_labels_exit_2_from_the_worker_naming_them_and_leave_no_run(tmp_path, isolated_home):
    data = synthetic_cases(tmp_path, {"one": blob(), "two": None})
    out = tmp_path / "run"
    done = run(mim3d("finetune", *synthetic_args(data, out)), isolated_home)
    assert done.returncode == 2
    error = protocol_events(done.stdout)[-1]
    assert error["kind"] == "bad_input"
    assert f"{data / 'labels'}: has no label for 1 image(s)" in error["message"] and "two.nii.gz" in error["message"]
    assert not out.exists()


def test_label_values_outside_the_table_are_refused_naming_the_case_and_values(tmp_path, capsys, isolated_home):
    data = synthetic_cases(tmp_path, {"one": blob(), "two": blob(value=7)})
    message = bad_input(synthetic_args(data, tmp_path / "run"), capsys)
    assert f"{data / 'labels' / 'two.nii.gz'}: case two has label values 7 that are not in the label table" in message
    assert not (tmp_path / "run").exists()


def test_keep_largest_naming_no_label_of_the_table_is_refused_before_the_run_starts(tmp_path, capsys,
                                                                                     isolated_home):
    data = synthetic_cases(tmp_path, {"one": blob()})
    message = bad_input(synthetic_args(data, tmp_path / "run", "--keep-largest", "liver", "kidney"), capsys)
    assert message == "--keep-largest: kidney not in the label table (1 liver, 2 spleen)"
    assert not (tmp_path / "run").exists()


def test_label_map_onto_values_outside_the_table_is_refused(tmp_path, capsys, isolated_home):
    data = synthetic_cases(tmp_path, {"one": blob()})
    message = bad_input(synthetic_args(data, tmp_path / "run", "--label-map", '{"1": 3}'), capsys)
    assert "label_map of case one maps to 3, not in the label table (1 liver, 2 spleen)" in message


def test_label_on_another_grid_is_refused_per_case_with_both_sizes(tmp_path, capsys, isolated_home):
    data = synthetic_cases(tmp_path, {"one": blob(), "two": blob(shape=(16, 24, 30))})
    message = bad_input(synthetic_args(data, tmp_path / "run"), capsys)
    assert f"{data / 'labels' / 'two.nii.gz'}: grid 30×24×16 does not match image two.nii.gz (32×24×16)" in message
    assert "one.nii.gz" not in message
    assert not (tmp_path / "run").exists()


def test_invalid_label_table_is_refused_naming_the_file_and_field(tmp_path, capsys, isolated_home):
    data = synthetic_cases(tmp_path, {"one": blob()})
    (data / "labels.json").write_text(json.dumps({"labels": [{"value": 1, "name": "liver"},
                                                             {"value": 1, "name": "spleen"}]}))
    message = bad_input(synthetic_args(data, tmp_path / "run"), capsys)
    assert f"{data / 'labels.json'}: labels[1].value: 1 is used twice" in message
    assert not (tmp_path / "run").exists()


def test_images_and_labels_without_a_label_table_are_refused(tmp_path, capsys, isolated_home):
    data = synthetic_cases(tmp_path, {"one": blob()})
    message = bad_input(["--images", str(data / "images"), "--labels", str(data / "labels"), "--out",
                         str(tmp_path / "run")], capsys)
    assert "give --label-table labels.json" in message


def test_empty_images_folder_is_refused_naming_it(tmp_path, capsys, isolated_home):
    data = synthetic_cases(tmp_path, {})
    (data / "images").mkdir()
    message = bad_input(synthetic_args(data, tmp_path / "run"), capsys)
    assert f"{data / 'images'}: no usable volume found" in message
    assert not (tmp_path / "run").exists()


def test_pretrained_file_that_is_not_a_checkpoint_is_refused_naming_it(tmp_path, capsys, isolated_home):
    data = synthetic_cases(tmp_path, {"one": blob()})
    weights = tmp_path / "encoder.pth"
    weights.write_text("not weights\n")
    message = bad_input(synthetic_args(data, tmp_path / "run", *overrides(NET["tiny"]), "--roi", "64", "64", "32",
                                       "--pretrained", str(weights)), capsys)
    assert message.startswith(f"{weights}: ") and "PyTorch checkpoint" in message
    assert not (tmp_path / "run").exists()


def test_mae_checkpoint_for_mim_unetr_is_refused_with_the_arch_to_use(tmp_path, capsys, isolated_home):
    from mim3d.models import build_pretrainer
    from mim3d.models.checkpoints import save_checkpoint
    from mim3d.presets import config_to_dict

    data = synthetic_cases(tmp_path, {"one": blob()})
    mae = build_pretrainer("mae", "small", input_size=32, hidden_size=48, mlp_dim=96, num_layers=1, num_heads=4,
                           decoder_dim=24, decoder_depth=1, decoder_heads=4)
    checkpoint = save_checkpoint(tmp_path / "mae.pt", method="mae", config=config_to_dict(mae.config),
                                 model_state=mae.state_dict())
    message = bad_input(synthetic_args(data, tmp_path / "run", *overrides(NET["tiny"]), "--roi", "64", "64", "32",
                                       "--pretrained", str(checkpoint)), capsys)
    assert f"{checkpoint}: a mae checkpoint holds a ViT encoder; fine-tune it with arch 'unetr'" in message
    assert not (tmp_path / "run").exists()


def test_mim_pretraining_run_for_unetr_is_refused_with_the_arch_to_use(pretrain_run, tmp_path, capsys,
                                                                      isolated_home):
    data = synthetic_cases(tmp_path, {"one": blob()})
    message = bad_input(synthetic_args(data, tmp_path / "run", "--arch", "unetr", "--pretrained", str(pretrain_run)),
                        capsys)
    assert message == (f"--pretrained {pretrain_run}: a mim pre-training run; its encoder fine-tunes with --arch "
                       "mim-unetr, not --arch unetr")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--dataset", "d.json", "--segmentations", "segs"], "give exactly one data source"),
    (["--labels", "labels"], "--labels needs --images"),
    (["--segmentations", "segs", "--val-cases", "a", "--val-fraction", "0.3"], "give --val-cases or --val-fraction"),
    (["--segmentations", "segs", "--roi", "64", "32", "32"], "--roi: 64 32 32; the first two edges must be equal"),
    (["--segmentations", "segs", "--roi", "64", "64"], "--roi: 64 64; give one value"),
    (["--segmentations", "segs", "--label-map", "{5: 1}"], "--label-map: not valid JSON"),
    (["--segmentations", "segs", "--label-map", '{"5": "liver"}'], "table values must be integers 0..255"),
    (["--segmentations", "segs"], "--out required for a new run"),
])
def test_conflicting_or_malformed_options_are_refused_before_any_data_is_read(argv, expected, tmp_path, capsys):
    out = [] if expected.startswith("--out") else ["--out", str(tmp_path / "run")]
    assert expected in bad_input(argv + out, capsys)
    assert not (tmp_path / "run").exists()


# ---- Dice and the split, directly ---------------------------------------------------------------------------------

def test_dice_per_label_is_nan_only_where_neither_prediction_nor_reference_has_the_label():
    table = LabelTable.from_dict({"labels": [{"value": 1, "name": "a"}, {"value": 2, "name": "b"},
                                             {"value": 4, "name": "d"}]})
    reference = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    prediction = torch.zeros_like(reference)
    reference[..., :2, :, :] = 1  # 32 voxels of a
    prediction[..., :1, :, :] = 1  # 16 of them predicted
    prediction[..., 3, 3, 3] = 2  # b predicted, absent from the reference
    dice = case_dice(prediction, reference, table)
    assert dice["a"] == pytest.approx(2 * 16 / (32 + 16)) and dice["b"] == 0.0 and math.isnan(dice["d"])


def test_mean_dice_skips_labels_with_nothing_to_score():
    table = LabelTable.from_dict({"labels": [{"value": 1, "name": "a"}, {"value": 2, "name": "b"}]})
    result = summarize({"x": {"a": 0.5, "b": math.nan}, "y": {"a": 0.7, "b": 0.9}}, table)
    assert result.dice == pytest.approx({"a": 0.6, "b": 0.9}) and result.mean_dice == pytest.approx(0.75)
    empty = summarize({"x": {"a": math.nan, "b": math.nan}}, table)
    assert math.isnan(empty.mean_dice)


def test_gradient_clipping_sees_the_unscaled_gradients_under_a_grad_scaler():
    from mim3d.training.finetune import ClippedAdamW

    torch.manual_seed(0)
    clipped, plain = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    plain.load_state_dict(clipped.state_dict())
    x = torch.randn(8, 4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(clipped(x).square().sum()).backward()
    scaler.step(ClippedAdamW(clipped.parameters(), lr=0.1, max_norm=0.01))  # the gradients it stepped with stay
    plain(x).square().sum().backward()
    norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.01)  # by hand, on the true gradients
    assert norm > 1.0  # so the clipping mattered
    assert all(torch.allclose(a.grad, b.grad) for a, b in zip(clipped.parameters(), plain.parameters(), strict=True))


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
@pytest.mark.parametrize("user_made", [True, False])
def test_bad_input_during_a_new_run_removes_what_it_wrote_and_keeps_a_user_made_folder(command, user_made, tmp_path):
    """Both commands end a run through the same lifecycle: after bad input, nothing the run wrote is left, and an
    empty --out folder the user made stays (finetune used to delete it)."""
    from mim3d.protocol import Emitter
    from mim3d.runs import RunDir
    from mim3d.training.finetune_writer import FinetuneRunWriter
    from mim3d.training.lifecycle import run_lifecycle
    from mim3d.training.run_writer import RunWriter

    run_dir = RunDir(tmp_path / "run")
    if user_made:
        run_dir.path.mkdir()
    writer_class = FinetuneRunWriter if command == "finetune" else RunWriter
    writer = writer_class(run_dir, active=True, emitter=Emitter(io.StringIO()), command=command, epochs=1,
                          steps_per_epoch=1, total_steps=1, log_every=1)
    with pytest.raises(BadInputError), run_lifecycle(writer, {"command": command}):
        writer.open(0)
        writer.set_state("starting")
        raise BadInputError("case x: unreadable")
    assert run_dir.path.is_dir() == user_made and not (user_made and any(run_dir.path.iterdir()))


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_an_error_during_a_run_marks_it_failed_with_the_same_message_format(command, tmp_path):
    from mim3d.protocol import Emitter
    from mim3d.runs import RunDir
    from mim3d.training.lifecycle import run_lifecycle
    from mim3d.training.run_writer import RunWriter

    run_dir = RunDir(tmp_path / "run")
    writer = RunWriter(run_dir, active=True, emitter=Emitter(io.StringIO()), command=command, epochs=1,
                       steps_per_epoch=1, total_steps=1, log_every=1)
    for error, message in ((RuntimeError("boom"), "RuntimeError: boom"), (KeyboardInterrupt(), "KeyboardInterrupt")):
        with pytest.raises(type(error)), run_lifecycle(writer, {"command": command} if message[0] == "R" else None):
            writer.open(0)
            raise error
        status = read_status(run_dir.path)
        assert (status["state"], status["message"]) == ("failed", message)


def _segmentation_folder(folder: Path) -> Path:
    """a.nii.gz and a.seg.nrrd (on its grid) with segments "liver" and "spleen"."""
    import slicerio

    write_image(folder / "a.nii.gz", make_image(ramp((8, 12, 16)), spacing=(2, 2, 3), direction=np.diag([-1, -1, 1])))
    seg = slicerio.create_segmentation((16, 12, 8), np.diag([-2.0, -2.0, 3.0, 1.0]))
    for name, box in (("liver", np.s_[1:5, 1:5, 1:3]), ("spleen", np.s_[8:12, 4:8, 4:6])):
        mask = np.zeros((16, 12, 8), bool)
        mask[box] = True
        slicerio.add_segment(seg, mask, {"id": name, "name": name, "color": [1.0, 0.0, 0.0]})
    slicerio.write_segmentation(str(folder / "a.seg.nrrd"), seg)
    return folder


def _source_options(**given):
    from mim3d.run_options import FinetuneOptions

    return FinetuneOptions(**given)


def test_segments_are_numbered_by_a_given_label_table_by_name(tmp_path):
    from mim3d.training.finetune_data import load_data

    folder = _segmentation_folder(tmp_path)
    (tmp_path / "table.json").write_text(json.dumps({"labels": [{"value": 3, "name": "spleen"},
                                                                {"value": 5, "name": "liver"}]}))
    data = load_data(_source_options(segmentations=str(folder), label_table=str(tmp_path / "table.json")))
    assert dict(data.cases[0].label_map) == {"liver": 5, "spleen": 3}
    assert data.table.num_classes == 6


def test_segment_missing_from_a_given_label_table_is_refused_naming_file_and_segment(tmp_path):
    from mim3d.training.finetune_data import load_data

    folder = _segmentation_folder(tmp_path)
    (tmp_path / "table.json").write_text(json.dumps({"labels": [{"value": 1, "name": "liver"}]}))
    with pytest.raises(BadInputError, match=re.escape(f"{folder / 'a.seg.nrrd'}: case a has segments 'spleen' that "
                                                      "are not in the label table")):
        load_data(_source_options(segmentations=str(folder), label_table=str(tmp_path / "table.json")))


def _cases(count: int):
    from mim3d.data.finetune_sources import FinetuneCase

    return [FinetuneCase(Path(f"{i}.nii.gz"), Path(f"l{i}.nii.gz"), f"case{i}") for i in range(count)]


def test_val_fraction_holds_out_at_least_one_case_and_a_single_case_validates_on_itself():
    opts = _source_options(val_cases=None, val_fraction=0.2, seed=0)
    train, val, _ = split(_cases(3), opts)
    assert len(val) == 1 and len(train) == 2 and not set(train) & set(val)
    train, val, _ = split(_cases(10), opts)
    assert (len(train), len(val)) == (8, 2)
    train, val, note = split(_cases(1), opts)
    assert train == val == _cases(1) and "validated on the training case" in note


def test_val_cases_naming_an_unknown_case_lists_the_cases():
    with pytest.raises(BadInputError, match="--val-cases: no case named case9; the cases are case0, case1"):
        split(_cases(2), _source_options(val_cases=("case9",), val_fraction=0.2, seed=0))



def test_crops_classes_weights_the_background_and_every_table_value_and_pos_neg_keeps_the_recipe(tmp_path):
    from mim3d.training.finetune import class_ratios
    from mim3d.training.finetune_data import load_data

    folder = _segmentation_folder(tmp_path)
    (tmp_path / "table.json").write_text(json.dumps({"labels": [
        {"value": 1, "name": "liver"}, {"value": 4, "name": "spleen"}]}))
    given = {"segmentations": str(folder), "label_table": str(tmp_path / "table.json")}
    data = load_data(_source_options(**given))
    assert class_ratios(data, _source_options(**given, crops="classes")) == (1.0, 1.0, 0.0, 0.0, 1.0)
    assert class_ratios(data, _source_options(**given)) == ()  # pos-neg, §9.5
    with pytest.raises(BadInputError, match="--crops"):
        _source_options(crops="random").validate()
