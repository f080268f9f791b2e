"""`bench/bench_demo_recipe.py`: the hold-out the demo's recipe is chosen on, and its quick run through the real
`mim3d finetune` worker, so that the benchmark cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from mim3d import example_data
from mim3d.demo import ORGANS

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from bench_demo_recipe import ARMS_MARGIN_MM, CONTRAST_HU, HELD_OUT, TISSUE_HU, TRAINING, VAL_CASES, hold_out  # noqa: E402


def test_the_hold_out_trains_around_the_held_out_slices_and_validates_them_as_another_patient_would_look(tmp_path):
    data = example_data.ensure()
    inputs = hold_out(data, tmp_path)
    whole = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "example_ct.nii.gz"))).astype(np.int16)  # (K, J, I)

    def read(kind: str, name: str) -> tuple[sitk.Image, np.ndarray]:
        image = sitk.ReadImage(str(inputs[kind] / f"{name}.nii.gz"))
        return image, sitk.GetArrayFromImage(image)

    depth = {p.name.removesuffix(".nii.gz"): sitk.ReadImage(str(p)).GetSize()[2] for p in inputs["images"].iterdir()}
    held_depth = HELD_OUT[1] - HELD_OUT[0]
    assert depth == {"lower": HELD_OUT[0], "upper": whole.shape[0] - HELD_OUT[1],
                     **{case: held_depth for case in VAL_CASES}}
    (held_image, held), (_, ids) = read("images", "held-out"), read("labels", "held-out")
    np.testing.assert_array_equal(held, whole[HELD_OUT[0]:HELD_OUT[1]])
    assert set(ORGANS) <= set(np.unique(ids).tolist())  # every organ is scored on the held-out slices
    upper = sitk.ReadImage(str(inputs["labels"] / "upper.nii.gz"))
    assert upper.GetOrigin()[2] > held_image.GetOrigin()[2]

    _, contrast = read("images", "held-out-contrast")
    expected = np.where(held > -100, held + TISSUE_HU, held)
    for structure, hu in CONTRAST_HU.items():
        expected[ids == structure] = held[ids == structure] + hu
    np.testing.assert_array_equal(contrast, expected)
    assert (contrast[ids == 52] - held[ids == 52] == 120).all()  # the aorta enhances most

    (arms_image, arms), (_, arms_ids) = read("images", "held-out-arms"), read("labels", "held-out-arms")
    side, back = (round(m / s) for m, s in zip(ARMS_MARGIN_MM, held_image.GetSpacing()[:2], strict=True))
    assert arms.shape == (held_depth, held.shape[1] + back, held.shape[2] + 2 * side)
    # the slab sits unchanged in the wider grid, at its own place in space (rows run from the back here)
    first = arms_image.TransformPhysicalPointToIndex(held_image.GetOrigin())
    assert first == (side, back, 0)
    np.testing.assert_array_equal(arms[:, back:, side:-side], contrast)
    np.testing.assert_array_equal(arms_ids[:, back:, side:-side], ids)
    assert not arms_ids[:, :back].any() and not arms_ids[..., :side].any() and not arms_ids[..., -side:].any()
    # arms beside the body at both sides, a table behind it: the body box is wider than the body
    assert (arms[:, :, :side] == 700).any() and (arms[:, :, -side:] == 700).any()
    table_rows = np.nonzero((arms[:, :back] == 300).all(axis=(0, 2)))[0]
    assert len(table_rows) >= 1 and arms_image.TransformIndexToPhysicalPoint((0, int(table_rows[0]), 0))[1] > \
        held_image.TransformIndexToPhysicalPoint((0, 0, 0))[1]  # LPS +y: behind the back


def test_the_quick_form_pre_trains_fine_tunes_on_the_hold_out_and_scores_the_held_out_slices(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH / "bench_demo_recipe.py"), "--out", str(tmp_path / "r"),
                           "--quick", "--pretrain", "--seed", "3"], capture_output=True, text=True, encoding="utf-8",
                          timeout=600, env={**os.environ, "PYTHONUTF8": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["benchmark"] == "demo_recipe" and result["quick"] is True and result["seed"] == 3
    run = result["variants"]["1x2"]
    assert run["crops_per_step"] == 1 and run["steps"] == 2 and run["rc"] == 0
    assert set(run["dice"]) == {name for _, name in ORGANS.values()}
    config = json.loads((tmp_path / "r" / "finetune-1x2" / "config.json").read_text())
    assert config["options"]["val_cases"] == list(VAL_CASES)
    for case in VAL_CASES:  # each one segmented by the run's model package and scored on its own grid
        assert set(run["segmented"][case]["dice"]) == {name for _, name in ORGANS.values()}
        assert (tmp_path / "r" / "finetune-1x2" / f"{case}.seg.nrrd").is_file()
    assert config["options"]["samples_per_volume"] == 1 and config["options"]["seed"] == 3
    # the demo's pre-training stage, on the training cases and the other people's CTs, never the held-out slices
    pretrained = result["plan"]["pretrained"]
    assert pretrained["steps"] == 2 and config["options"]["pretrained"] == pretrained["run"]
    assert pretrained["scans"] == sorted([*(f"{case}.nii.gz" for case in TRAINING), *example_data.PRETRAIN_CTS])
    pretrain_config = json.loads((tmp_path / "r" / "pretrain" / "config.json").read_text())
    assert pretrain_config["options"]["method"] == "mim" and pretrain_config["options"]["seed"] == 3
    assert json.loads((tmp_path / "r" / "results.json").read_text()) == result
