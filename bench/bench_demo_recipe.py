"""The demo's CPU recipe on a hold-out of its own training scan, the way `mim3d.demo.RECIPE` was chosen: never on the
unseen scan's labels. Prints one JSON object (also written to --out/results.json).

`example_ct` slices 86-99 (39 mm through liver, spleen, kidneys, stomach and aorta) are held out; slices 0-85 and
100-111 train, as two cases, so that the held-out level's anatomy is in training as it is for the demo's unseen scan.
The held-out slices are validated three ways: as they are; in a portal-venous phase (textbook enhancement added per
structure); and that with the arms down beside the body and a table behind it, so that the body box `mim3d segment`
tiles is wider than the body, as on another scanner's patient. Each --variant CROPSxSTEPS runs `mim3d finetune` from
scratch with the demo's CPU plan (model, spacing, crop size, learning rate, augmentation) but that many crops per step
and steps, validated on the three at its end ("dice": the mean over them); then `mim3d segment` runs its model package
on each, scored on the case's own grid ("segmented"). With --pretrain the variants start from the demo's pre-training
stage instead (its steps and settings), run on the two training cases and the other people's CTs the demo pre-trains
on, so the held-out slices stay unseen as the demo's unseen scan does.

    python bench/bench_demo_recipe.py --out runs/recipe                       # 1x750 (the plan) and 4x187: ~15 min
    python bench/bench_demo_recipe.py --out runs/recipe --variant 1x400 --variant 2x200 --seed 1
    python bench/bench_demo_recipe.py --out runs/recipe-pre --variant 1x750 --pretrain    # the plan, pre-trained
    python bench/bench_demo_recipe.py --out /tmp/recipe --quick               # seconds: the same path, 2 steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from bench_finetune_modes import _step_seconds, _worker
from bench_pretraining_benefit import _prepare_out

from mim3d import example_data
from mim3d.demo import ORGANS, PLANS, QUICK, keep_largest_args, link_or_copy, pretrain_command
from mim3d.demo_report import score_organs
from mim3d.labels import LabelTable
from mim3d.runs import read_metrics

HELD_OUT = (86, 100)  # example_ct slices [86, 100): validated, never trained
TRAINING = {"lower": (0, HELD_OUT[0]), "upper": (HELD_OUT[1], None)}  # the training cases: slices [first, stop)
PARTS = {**TRAINING, "held-out": HELD_OUT}
# Portal-venous enhancement (HU added; textbook values, not measured on any scan here) by TotalSegmentator "total"
# id: liver, spleen, kidneys, aorta, inferior vena cava, portal and splenic vein; other tissue above -100 HU: TISSUE_HU.
CONTRAST_HU = {5: 50, 1: 60, 2: 120, 3: 120, 52: 120, 63: 80, 64: 100}
TISSUE_HU = 10
ARMS_MARGIN_MM = (110, 60)  # the held-out-arms grid: this much wider at each side, and behind the back
VAL_CASES = ("held-out", "held-out-contrast", "held-out-arms")
# the demo's plan, and four crops a step at the same number of crops
DEFAULT_VARIANTS = (f"1x{PLANS['cpu']['finetune']}", f"4x{PLANS['cpu']['finetune'] // 4}")


def main() -> None:
    args = _parse_args()
    plan = {**PLANS["cpu"], **({"pretrain": QUICK["pretrain"]} if args.quick else {})}
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    out = _prepare_out(Path(args.out), ".bench-demo-recipe")
    started = time.perf_counter()
    data = example_data.ensure()
    inputs = hold_out(data, out / "inputs")
    pretrained = _pretrain(data, inputs, out, plan, args) if args.pretrain else None
    runs = {variant: _run(variant, inputs, out, plan, args) for variant in args.variant}
    results = {"benchmark": "demo_recipe", "quick": args.quick, "seed": args.seed, "threads": args.threads,
               "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "python": platform.python_version()},
               "data": {"train": ["example_ct slices 0-85", "example_ct slices 100-111"],
                        "validation": ["example_ct slices 86-99", "the same in a portal-venous phase",
                                       "that with arms down beside the body and a table behind it"]},
               "plan": {"model": plan["model"] + plan["finetune_model"], "spacing": plan["spacing"],
                        "roi": plan["roi"], "crops": plan["crops"], "lr": plan["finetune_lr"],
                        "keep_largest": plan["keep_largest"], "pretrained": pretrained},
               "variants": runs, "seconds": round(time.perf_counter() - started, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(results))


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (new or empty; an earlier result is replaced)")
    parser.add_argument("--variant", action="append", type=_variant,
                        help="CROPSxSTEPS: crops per step and steps (repeatable; default "
                        f"{' and '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--seed", type=int, default=0, help="mim3d finetune --seed: initial weights and crops")
    parser.add_argument("--quick", action="store_true", help="one 1x2 variant: checks the path only")
    parser.add_argument("--pretrain", action="store_true", help="start from the demo's pre-training stage")
    parser.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of the workers (default 2)")
    args = parser.parse_args()
    args.variant = ["1x2"] if args.quick else args.variant or list(DEFAULT_VARIANTS)
    return args


def _variant(text: str) -> str:
    if not re.fullmatch(r"[1-9]\d*x[1-9]\d*", text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected CROPSxSTEPS, e.g. 1x800")
    return text


def hold_out(data: Path, folder: Path) -> dict[str, Path]:
    """The training and validation cases of the hold-out, as `mim3d finetune --images/--labels` reads them."""
    images, labels = folder / "images", folder / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    ct = sitk.Cast(sitk.ReadImage(str(data / "example_ct.nii.gz")), sitk.sitkInt16)
    reference = sitk.ReadImage(str(data / "example_seg_fast_force_split.nii.gz"))
    cases = {name: (ct[:, :, first:stop], reference[:, :, first:stop]) for name, (first, stop) in PARTS.items()}
    held, held_labels = cases["held-out"]
    enhanced = contrast_phase(held, held_labels)
    cases["held-out-contrast"] = enhanced, held_labels
    cases["held-out-arms"] = arms_and_table(enhanced, held_labels)
    for name, (image, label) in cases.items():
        sitk.WriteImage(image, str(images / f"{name}.nii.gz"), useCompression=True)
        sitk.WriteImage(label, str(labels / f"{name}.nii.gz"), useCompression=True)
    table = folder / "labels.json"
    LabelTable.from_dict({"labels": [{"value": v, "name": n} for v, n in sorted(ORGANS.values())]}).save(table)
    return {"images": images, "labels": labels, "table": table}


def contrast_phase(ct: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """The slab as a portal-venous scan would show it: CONTRAST_HU added inside each structure, TISSUE_HU to the
    other voxels above -100 HU."""
    voxels, ids = sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(reference)
    enhanced = np.where(voxels > -100, voxels + TISSUE_HU, voxels)
    for structure, hu in CONTRAST_HU.items():
        enhanced[ids == structure] = voxels[ids == structure] + hu
    image = sitk.GetImageFromArray(enhanced.astype(np.int16))
    image.CopyInformation(ct)
    return image


def arms_and_table(ct: sitk.Image, reference: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """The slab with the arms down beside the body and a table behind it, on a grid ARMS_MARGIN_MM wider at each side
    and behind: the body box that `mim3d segment` tiles is then wider than the body, as on another scanner's patient.
    Each arm is an ellipse of muscle (40 HU, 80 x 100 mm) around a bone (700 HU, 24 mm), 60 mm from the body; the
    table a 6 mm band of 300 HU, 25 mm behind the back. Labels are padded with background."""
    voxels, ids = sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(reference)  # (K, J, I)
    spacing = np.array(ct.GetSpacing()[:2])
    side, back = (int(round(m / s)) for m, s in zip(ARMS_MARGIN_MM, spacing, strict=True))
    back_first = ct.GetDirection()[4] < 0  # rows run from posterior (+y in LPS) to anterior
    rows = (back, 0) if back_first else (0, back)
    voxels = np.pad(voxels, ((0, 0), rows, (side, side)), constant_values=-1024)
    ids = np.pad(ids, ((0, 0), rows, (side, side)))
    row, column = np.nonzero((voxels > -300).any(0))
    y, x = np.mgrid[:voxels.shape[1], :voxels.shape[2]] * spacing[::-1, None, None]
    centre_y = (row.min() + row.max()) / 2 * spacing[1]
    for edge, away in ((column.min(), -1), (column.max(), 1)):
        centre_x = edge * spacing[0] + away * 60
        voxels[:, ((x - centre_x) / 40) ** 2 + ((y - centre_y) / 50) ** 2 <= 1] = 40
        voxels[:, (x - centre_x) ** 2 + (y - centre_y) ** 2 <= 12 ** 2] = 700
    table_mm = row.min() * spacing[1] - 25 if back_first else row.max() * spacing[1] + 25
    voxels[:, (y >= table_mm - 3) & (y < table_mm + 3)] = 300
    origin = ct.TransformIndexToPhysicalPoint((-side, -rows[0], 0))
    image, label = sitk.GetImageFromArray(voxels.astype(np.int16)), sitk.GetImageFromArray(ids)
    for out in (image, label):
        out.SetSpacing(ct.GetSpacing())
        out.SetDirection(ct.GetDirection())
        out.SetOrigin(origin)
    return image, label


def _pretrain(data: Path, inputs: dict[str, Path], out: Path, plan: dict, args) -> dict:
    """The demo's pre-training stage on the training cases and the other CTs; what the variants start from."""
    scans = out / "inputs" / "pretrain"
    scans.mkdir()
    for case in TRAINING:
        link_or_copy(inputs["images"] / f"{case}.nii.gz", scans / f"{case}.nii.gz")
    for name in example_data.PRETRAIN_CTS:
        link_or_copy(data / name, scans / name)
    run = out / "pretrain"
    seconds = _worker([*pretrain_command(plan, scans, run, "cpu"), "--workers", "0", "--seed", str(args.seed)],
                      out / "pretrain.json")
    steps = sum(1 for m in read_metrics(run) if m.get("kind") == "train")
    return {"run": str(run), "scans": sorted(p.name for p in scans.iterdir()), "steps": steps, "wall_seconds": seconds}


def _run(variant: str, inputs: dict[str, Path], out: Path, plan: dict, args) -> dict:
    crops, steps = variant.split("x")
    epochs = str(-(-int(steps) // len(TRAINING)))  # batch 1: an epoch is one step per training case
    run = out / f"finetune-{variant}"
    label_map = json.dumps({str(k): v for k, (v, _) in ORGANS.items()})
    seconds = _worker(["finetune", "--images", str(inputs["images"]), "--labels", str(inputs["labels"]),
                       "--label-table", str(inputs["table"]), "--label-map", label_map, "--val-cases", *VAL_CASES,
                       "--arch", "mim-unetr", *plan["model"], *plan["finetune_model"], "--roi", *plan["roi"],
                       "--spacing", *plan["spacing"], "--samples-per-volume", crops, "--crops", plan["crops"],
                       *keep_largest_args(plan), *(["--pretrained", str(out / "pretrain")] if args.pretrain else []),
                       "--lr", plan["finetune_lr"], "--epochs", epochs, "--max-steps", steps,
                       "--val-every", epochs, "--checkpoint-every", steps, "--out", str(run),
                       "--device", "cpu", "--log-every", "1", "--workers", "0", "--seed", str(args.seed)],
                      out / f"finetune-{variant}.json")
    final = [m for m in read_metrics(run) if m.get("kind") == "validation"][-1]
    return {"crops_per_step": int(crops), "steps": final["step"], "mean_dice": final["mean_dice"],
            "dice": final["dice"], "segmented": {case: _segment_and_score(inputs, run, case) for case in VAL_CASES},
            "training_seconds": round(sum(_step_seconds(run)), 1), "wall_seconds": seconds,
            **json.loads((out / f"finetune-{variant}.json").read_text())}


def _segment_and_score(inputs: dict[str, Path], run: Path, case: str) -> dict:
    """One validation case through `mim3d segment` with the run's model package, as the demo segments its unseen
    scan (body box, windows, labels back onto the case's grid), scored there: Dice per organ and their mean."""
    image, segmentation = inputs["images"] / f"{case}.nii.gz", run / f"{case}.seg.nrrd"
    _worker(["segment", str(image), "--model", str(run / "model"), "--output", str(segmentation), "--device", "cpu"],
            run / f"segment-{case}.json")
    organs, _, _ = score_organs(sitk.ReadImage(str(segmentation)), sitk.ReadImage(str(inputs["labels"] /
                                f"{case}.nii.gz")), sitk.ReadImage(str(image)), ORGANS)
    dice = {name: organ["dice"] for name, organ in organs.items()}
    return {"dice": dice, "mean_dice": round(float(np.mean([d for d in dice.values() if d is not None])), 4)}


if __name__ == "__main__":
    main()
