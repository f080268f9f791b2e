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

from bench_demo_recipe import HELD_OUT, hold_out  # noqa: E402


def test_the_hold_out_trains_around_the_held_out_slices_and_shifts_only_tissue_in_its_copy(tmp_path):
    data = example_data.ensure()
    inputs = hold_out(data, tmp_path)
    whole = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "example_ct.nii.gz"))).astype(np.int16)  # (K, J, I)
    depth = {p.name.removesuffix(".nii.gz"): sitk.ReadImage(str(p)).GetSize()[2] for p in inputs["images"].iterdir()}
    held_depth = HELD_OUT[1] - HELD_OUT[0]
    assert depth == {"lower": HELD_OUT[0], "held-out": held_depth, "held-out-shifted": held_depth,
                     "upper": whole.shape[0] - HELD_OUT[1]}
    held = sitk.GetArrayFromImage(sitk.ReadImage(str(inputs["images"] / "held-out.nii.gz")))
    shifted = sitk.GetArrayFromImage(sitk.ReadImage(str(inputs["images"] / "held-out-shifted.nii.gz")))
    np.testing.assert_array_equal(held, whole[HELD_OUT[0]:HELD_OUT[1]])
    tissue = held > -100
    np.testing.assert_array_equal(shifted[tissue], held[tissue] + 40)
    np.testing.assert_array_equal(shifted[~tissue], held[~tissue])
    upper = sitk.ReadImage(str(inputs["labels"] / "upper.nii.gz"))
    assert upper.GetOrigin()[2] > sitk.ReadImage(str(inputs["labels"] / "held-out.nii.gz")).GetOrigin()[2]
    held_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(inputs["labels"] / "held-out.nii.gz")))
    assert set(ORGANS) <= set(np.unique(held_labels).tolist())  # every organ is scored on the held-out slices


def test_the_quick_form_fine_tunes_on_the_hold_out_and_scores_the_held_out_slices(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH / "bench_demo_recipe.py"), "--out", str(tmp_path / "r"),
                           "--quick", "--seed", "3"], capture_output=True, text=True, encoding="utf-8", timeout=600,
                          env={**os.environ, "PYTHONUTF8": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["benchmark"] == "demo_recipe" and result["quick"] is True and result["seed"] == 3
    run = result["variants"]["1x2"]
    assert run["crops_per_step"] == 1 and run["steps"] == 2 and run["rc"] == 0
    assert set(run["dice"]) == {name for _, name in ORGANS.values()}
    config = json.loads((tmp_path / "r" / "finetune-1x2" / "config.json").read_text())
    assert config["options"]["val_cases"] == ["held-out", "held-out-shifted"]
    assert config["options"]["samples_per_volume"] == 1 and config["options"]["seed"] == 3
    assert json.loads((tmp_path / "r" / "results.json").read_text()) == result
