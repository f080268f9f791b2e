"""`mim3d segment`: real CT and DICOM in, labels on exactly their grids out (.seg.nrrd readable by slicerio, plain
labelmaps), progress and result events, SIGTERM without leftovers, and every bad input refused by name.

The model is a real mim-unetr (small preset, random weights: these tests are about geometry and protocol), saved as
a package; variants of it share the weights and change only model.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch
from segment_helpers import LABELS, model_info
from volume_helpers import OBLIQUE, make_image, write_image

from mim3d import io, registry
from mim3d.__main__ import main
from mim3d.inference import plans
from mim3d.inference.output import write_labels
from mim3d.models import build_segmenter
from mim3d.package import MODEL_JSON, WEIGHTS, save_package
from mim3d.protocol import EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_OK, parse_line

STAGES = ["load", "preprocess", "windows", "postprocess", "write"]


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """mim-unetr small, 64³ windows, at 8 mm: one window covers the example CT's body."""
    torch.manual_seed(0)
    model = build_segmenter("mim-unetr", 3, preset="small", roi_size=(64, 64, 64))
    folder = tmp_path_factory.mktemp("models") / "coarse"
    save_package(folder, model, model_info(spacing_mm=(8.0, 8.0, 8.0), roi_size=(64, 64, 64), overlap=0.25))
    return folder


def variant(package: Path, target: Path, **preprocessing) -> Path:
    """The same weights with other preprocessing settings in model.json."""
    target.mkdir(parents=True)
    os.link(package / WEIGHTS, target / WEIGHTS)
    description = json.loads((package / MODEL_JSON).read_text())
    description["preprocessing"].update(preprocessing)
    (target / MODEL_JSON).write_text(json.dumps(description))
    return target


def run_cli(capsys, *argv) -> tuple[int, list[dict]]:
    code = main(["segment", *map(str, argv)])
    events = [e for e in map(parse_line, capsys.readouterr().out.splitlines()) if e is not None]
    return code, events


def assert_on_grid(path: Path, reference: sitk.Image, atol: float = 1e-6) -> sitk.Image:
    labels = sitk.ReadImage(str(path))
    assert labels.GetSize() == reference.GetSize()
    np.testing.assert_allclose(labels.GetSpacing(), reference.GetSpacing(), atol=atol)
    np.testing.assert_allclose(labels.GetOrigin(), reference.GetOrigin(), atol=atol)
    np.testing.assert_allclose(labels.GetDirection(), reference.GetDirection(), atol=atol)
    return labels


def test_dicom_series_and_nifti_ct_get_labels_on_exactly_their_grids(package, example_dicom_dir, example_ct_path,
                                                                       tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "mim3d", "segment", str(example_dicom_dir), str(example_ct_path),
                           "--model", str(package), "--output", str(out), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_OK, proc.stderr
    events = [e for e in map(parse_line, proc.stdout.splitlines()) if e is not None]
    result = events[-1]
    assert result["type"] == "result" and result["device"] == "cpu"
    assert result["outputs"] == [str(out / "example_ct_dicom.seg.nrrd"), str(out / "example_ct.seg.nrrd")]
    for source, output in zip((example_dicom_dir, example_ct_path), result["outputs"], strict=True):
        labels = assert_on_grid(Path(output), io.read_volume(source))
        assert labels.GetPixelID() == sitk.sitkUInt8
    stages = [e["stage"] for e in events if e["type"] == "progress" and e["message"].startswith("[2/2]")]
    assert [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s] == STAGES
    assert set(STAGES) | {"total"} <= set(result["cases"][1]["timings_s"])
    assert sorted(p.name for p in out.iterdir()) == ["example_ct.seg.nrrd", "example_ct_dicom.seg.nrrd"]


def test_seg_nrrd_from_an_installed_model_opens_in_slicerio_with_names_colours_and_terminology(
        package, example_ct_sm_path, mim3d_home, tmp_path, capsys):
    registry.import_package(package, "abdomen-test")
    output = tmp_path / "ct.seg.nrrd"
    code, events = run_cli(capsys, example_ct_sm_path, "--model", "abdomen-test", "--output", output)
    assert code == EXIT_OK and events[-1]["model"]["path"] == str(mim3d_home / "models" / "abdomen-test")
    segmentation = slicerio.read_segmentation(str(output))
    segments = {s["name"]: s for s in segmentation["segments"]}
    assert list(segments) == ["tissue", "right edge"]
    assert segments["tissue"]["labelValue"] == 1 and segments["right edge"]["labelValue"] == 2
    np.testing.assert_allclose(segments["tissue"]["color"], np.array([221, 130, 101]) / 255, atol=1e-5)
    assert segments["tissue"]["terminology"]["type"] == ["SCT", "85756007", "Tissue"]
    reference = io.read_volume(example_ct_sm_path)
    expected = np.eye(4)
    expected[:3, :3] = np.reshape(reference.GetDirection(), (3, 3)) * reference.GetSpacing()
    expected[:3, 3] = reference.GetOrigin()
    np.testing.assert_allclose(segmentation["ijkToLPS"], expected, atol=1e-6)
    assert_on_grid(output, reference)


@pytest.mark.parametrize("name", ["labels.seg.nrrd", "labels.nii.gz", "labels.nrrd"])
def test_writers_keep_every_voxel_and_the_oblique_grid(name, tmp_path):
    values = (np.arange(5 * 6 * 7) % 3).astype(np.uint8).reshape(5, 6, 7)  # (K, J, I), no symmetry
    labels = make_image(values, spacing=(0.7, 1.1, 2.5), origin=(10.0, -20.0, 30.0), direction=OBLIQUE)
    write_labels(labels, LABELS, tmp_path / name)
    back = assert_on_grid(tmp_path / name, labels, atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), values)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left
    if name.endswith(".seg.nrrd"):
        np.testing.assert_array_equal(slicerio.read_segmentation(str(tmp_path / name))["voxels"], values.T)


def test_a_nifti_labelmap_restricted_to_an_roi_in_ras_keeps_the_input_grid(package, example_ct_path, tmp_path, capsys):
    reference = io.read_volume(example_ct_path)
    start, stop = (20, 30, 40), (90, 80, 100)  # voxel box (I, J, K), stop exclusive
    lps = [reference.TransformIndexToPhysicalPoint(start), reference.TransformIndexToPhysicalPoint(
        [s - 1 for s in stop])]
    ras = [v for p in lps for v in (-p[0], -p[1], p[2])]  # what Slicer shows
    code, events = run_cli(capsys, example_ct_path, "--model", package, "--output", tmp_path / "roi.nii.gz",
                           "--roi", *ras, "--no-amp", "--keep-largest")
    assert code == EXIT_OK, events[-1]
    assert events[-1]["cases"][0]["plan"] == "cpu, 1 window(s) per pass, float32"
    labels = sitk.GetArrayFromImage(assert_on_grid(tmp_path / "roi.nii.gz", reference, atol=1e-4))
    inside = np.zeros(labels.shape, bool)
    inside[tuple(slice(a, b) for a, b in zip(reversed(start), reversed(stop), strict=True))] = True
    assert labels[inside].any() and not labels[~inside].any()


def test_fast_mode_writes_an_nrrd_labelmap_on_the_input_grid_and_warns_about_an_mr_input(
        package, example_data, tmp_path, capsys):
    mr = example_data / "example_mr_sm.nii.gz"
    code, events = run_cli(capsys, mr, "--model", package, "--output", tmp_path / "mr.nrrd", "--fast")
    assert code == EXIT_OK
    assert_on_grid(tmp_path / "mr.nrrd", io.read_volume(mr))
    assert any("do not look like CT" in w for w in events[-1]["warnings"])
    assert any(e["type"] == "progress" and e["message"].startswith("warning: ") for e in events)
    assert events[-1]["cases"][0]["model_grid"] == [22, 18, 4]  # 351×273×60 mm (MR: all "body") at 16 mm
    mixed = plans.amp_dtype(torch.device("cpu"))  # --amp is the default: bf16 where this CPU computes it natively
    assert events[-1]["cases"][0]["plan"].endswith(str(mixed).removeprefix("torch.") if mixed else "float32")


def test_sigterm_after_the_first_window_exits_130_and_leaves_no_output(package, example_ct_path, tmp_path):
    fine = variant(package, tmp_path / "fine", spacing_mm=[3.0, 3.0, 3.0])  # 12 windows on the example CT's body
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "mim3d", "segment", str(example_ct_path), "--model", str(fine),
                             "--output", str(out / "seg.seg.nrrd"), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    events = []
    for line in proc.stdout:
        event = parse_line(line)
        events.append(event)
        if event and event["type"] == "progress" and event["stage"] == "windows":
            proc.send_signal(signal.SIGTERM)
            break
    remaining, _ = proc.communicate(timeout=120)
    events += [parse_line(line) for line in remaining.splitlines()]
    windows_done = [e for e in events if e and e["type"] == "progress" and e["stage"] == "windows"]
    assert proc.returncode == EXIT_CANCELLED
    assert events[-1]["type"] == "error" and events[-1]["kind"] == "cancelled"
    total = int(windows_done[0]["message"].rsplit("/", 1)[1])
    assert total > 3 and len(windows_done) <= 3  # stopped within a window or two of the signal
    assert list(out.iterdir()) == []


def _two_d(tmp_path: Path) -> Path:
    return write_image(tmp_path / "slice.nii.gz", make_image(np.zeros((30, 40), np.int16)))


def _four_d(tmp_path: Path) -> Path:
    volume = make_image(np.zeros((6, 7, 8), np.int16))
    return write_image(tmp_path / "series.nii.gz", sitk.JoinSeries([volume, volume]))


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    return tmp_path / "empty.nii.gz"


def _truncated(tmp_path: Path, source: Path) -> Path:
    data = source.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.nii.gz"


def _no_series(tmp_path: Path) -> Path:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    (tmp_path / "notes" / "IM0001").write_bytes(b"not dicom")
    return tmp_path / "notes"


@pytest.mark.parametrize(("case", "message"), [
    ("2-D", "slice.nii.gz: is a 2-D image"),
    ("4-D", "series.nii.gz: is a 4-D image"),
    ("empty", "empty.nii.gz: could not be read"),
    ("truncated", "cut.nii.gz: is truncated: its header describes 739672 bytes"),
    ("no series", "notes: holds no readable DICOM series"),
])
def test_a_bad_input_is_refused_by_name_with_exit_2_and_no_output(case, message, package, example_ct_sm_path,
                                                                   tmp_path, capsys):
    make = {"2-D": _two_d, "4-D": _four_d, "empty": _empty, "no series": _no_series,
            "truncated": lambda t: _truncated(t, example_ct_sm_path)}[case]
    (tmp_path / "inputs").mkdir()
    bad = make(tmp_path / "inputs")
    out = tmp_path / "out"
    code, events = run_cli(capsys, bad, "--model", package, "--output", out / "seg.nii.gz")
    assert code == EXIT_BAD_INPUT
    assert events[-1]["type"] == "error" and events[-1]["kind"] == "bad_input"
    assert re.search(message, events[-1]["message"]), events[-1]["message"]
    assert not out.exists()


def test_a_bad_model_is_refused_by_name_with_exit_2_and_no_output(package, example_ct_sm_path, tmp_path, capsys,
                                                                  mim3d_home):
    no_json = tmp_path / "no-json"
    no_json.mkdir()
    shutil.copy(package / WEIGHTS, no_json / WEIGHTS)
    mismatched = tmp_path / "mismatched"
    tiny = build_segmenter("mim-unetr", 3, preset="small", roi_size=(64, 64, 64), embed_dims=(12, 24, 48, 96))
    save_package(mismatched, tiny, model_info(roi_size=(64, 64, 64)))  # model.json says the small preset
    out = tmp_path / "out"
    for model, message in [(no_json, f"{no_json}: not a mim3d model package (no model.json)"),
                           (mismatched, f"{mismatched / WEIGHTS}: weights do not match the mim-unetr"),
                           ("no-such-model", "--model no-such-model: no such folder and no installed model")]:
        code, events = run_cli(capsys, example_ct_sm_path, "--model", model, "--output", out / "seg.nii.gz")
        assert code == EXIT_BAD_INPUT and events[-1]["message"].startswith(message), events[-1]["message"]
    assert not out.exists()


@pytest.mark.parametrize(("output", "message"), [
    ("one.nii.gz", "with 2 inputs, give a folder"),
    ("picture.png", "'picture.png' is not an output format"),
])
def test_an_output_that_cannot_hold_the_result_is_refused(output, message, package, example_ct_sm_path,
                                                          example_ct_path, tmp_path, capsys):
    code, events = run_cli(capsys, example_ct_sm_path, example_ct_path, "--model", package,
                           "--output", tmp_path / output)
    assert code == EXIT_BAD_INPUT and message in events[-1]["message"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_refused(package, example_ct_sm_path, tmp_path, capsys):
    code, events = run_cli(capsys, example_ct_sm_path, "--model", package, "--output", tmp_path / "s.nii.gz",
                           "--device", "cuda")
    assert code == EXIT_BAD_INPUT and events[-1]["message"].startswith("--device cuda: no CUDA GPU is usable here")
