"""`mim3d demo --quick`: the README's main job, end to end through the real commands, with a complete report."""

import json
import math
import os
import subprocess
import sys

import pytest
import SimpleITK as sitk

from mim3d.io import read_volume
from mim3d.package import read_model_json


@pytest.fixture(scope="module")
def demo(tmp_path_factory, example_data):
    out = tmp_path_factory.mktemp("demo") / "out"
    env = {**os.environ, "MIM3D_HOME": str(tmp_path_factory.mktemp("home"))}
    done = subprocess.run([sys.executable, "-m", "mim3d", "demo", "--quick", "--out", str(out), "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_demo_writes_every_promised_file(demo):
    out, _ = demo
    for name in ("report.json", "report.md", "segmentation.seg.nrrd", "overlay_axial.png", "overlay_coronal.png",
                 "training.png", "finetune/model/model.json", "finetune/model/weights.safetensors",
                 "pretrain/checkpoints/last.pt", "finetune/checkpoints/best.pt"):
        assert (out / name).is_file(), name
    assert read_model_json(out / "finetune" / "model").labels.names == (
        "liver", "spleen", "right kidney", "left kidney", "stomach", "aorta")


def test_demo_report_has_numeric_dice_for_each_organ_and_the_timings(demo):
    out, _ = demo
    report = json.loads((out / "report.json").read_text())
    dice = report["unseen_scan"]["dice"]
    assert set(dice) == {"liver", "spleen", "right kidney", "left kidney", "stomach", "aorta"}
    assert all(isinstance(d, float) and 0 <= d <= 1 for d in dice.values() if d is not None)
    assert isinstance(report["unseen_scan"]["mean_dice"], float) and not math.isnan(report["unseen_scan"]["mean_dice"])
    assert set(report["timings_seconds"]) == {"pretrain", "finetune", "segment", "total"}
    assert "| **mean** (organs the reference holds) |" in (out / "report.md").read_text()


def test_demo_report_gives_each_organs_reference_volume_the_machine_and_how_the_recipe_was_chosen(demo):
    out, _ = demo
    report = json.loads((out / "report.json").read_text())
    organs = report["unseen_scan"]["organs"]
    assert organs["liver"]["reference_ml"] > 500 and organs["spleen"]["reference_ml"] > 100  # TEST_DATA.md §5
    assert organs["right kidney"]["reference_ml"] == 0  # not in the 4 cm slab
    assert all(o["predicted_ml"] >= 0 and o["dice"] == report["unseen_scan"]["dice"][name]
               for name, o in organs.items())
    present = [o["dice"] for o in organs.values() if o["reference_ml"] > 0]
    assert report["unseen_scan"]["mean_dice_reference_organs"] == pytest.approx(sum(present) / len(present), abs=1e-4)
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    assert "training scan alone" in report["plan"]["recipe"] and "cannot show" in report["budget"]
    markdown = (out / "report.md").read_text()
    assert report["plan"]["crops_centred"] == "classes" and "each organ and the background" in markdown
    assert report["plan"]["keep_largest"] == ["liver", "spleen"] and "largest piece of liver and spleen" in markdown
    assert "reference volume (ml)" in markdown and report["machine"]["cpu"] in markdown


def test_demo_model_keeps_one_piece_of_liver_and_spleen_on_the_unseen_scan(demo):
    out, _ = demo
    assert read_model_json(out / "finetune" / "model").inference["keep_largest"] == ["liver", "spleen"]
    labels = sitk.ReadImage(str(out / "segmentation.seg.nrrd"))
    for value in (1, 2):  # liver, spleen: the package's default, segment was given no option
        pieces = sitk.ConnectedComponentImageFilter()
        pieces.Execute(labels == value)
        assert pieces.GetObjectCount() <= 1


def test_demo_pretrains_on_three_peoples_ct_but_never_on_the_unseen_scan(demo):
    out, _ = demo
    assert sorted(p.name for p in (out / "inputs" / "pretrain").iterdir()) == [
        "aorta_report_ct.nii.gz", "example_ct.nii.gz", "pulmonary_report_ct.nii.gz"]


def test_demo_segmentation_sits_exactly_on_the_unseen_scan_grid(demo, example_dicom_dir):
    out, _ = demo
    ct, segmentation = read_volume(example_dicom_dir), sitk.ReadImage(str(out / "segmentation.seg.nrrd"))
    assert segmentation.GetSize() == ct.GetSize()
    for a, b in ((segmentation.GetSpacing(), ct.GetSpacing()), (segmentation.GetOrigin(), ct.GetOrigin()),
                 (segmentation.GetDirection(), ct.GetDirection())):
        assert a == pytest.approx(b, abs=1e-6)


def test_demo_reports_progress_and_ends_with_a_result_event(demo):
    _, done = demo
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    stages = [e["stage"] for e in events if e["type"] == "progress"]
    assert {"pretrain", "finetune", "segment", "report"} <= set(stages)
    assert events[-1]["type"] == "result" and events[-1]["report"].endswith("report.json")


def test_demo_refuses_a_folder_that_holds_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    done = subprocess.run([sys.executable, "-m", "mim3d", "demo", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "folder is not empty and holds no earlier demo" in done.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"
