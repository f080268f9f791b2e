"""The demo's CPU recipe on a hold-out of its own training scan, the way `mim3d.demo.RECIPE` was chosen: never on the
unseen scan's labels. Prints one JSON object (also written to --out/results.json).

`example_ct` slices 86-99 (39 mm through liver, spleen, kidneys, stomach and aorta) are held out, as they are and with
+40 HU on tissue (another scanner or contrast phase); slices 0-85 and 100-111 train, as two cases, so that the held-out
level's anatomy is in training as it is for the demo's unseen scan. Each --variant CROPSxSTEPS runs `mim3d finetune`
from scratch with the demo's CPU plan (model, spacing, crop size, learning rate, augmentation) but that many crops per
step and steps, validated on the held-out slices at its end; the Dice per organ is the mean over the two copies.

    python bench/bench_demo_recipe.py --out runs/recipe                       # 1x800 and 4x200: ~15 min on 2 cores
    python bench/bench_demo_recipe.py --out runs/recipe --variant 1x400 --variant 2x200 --seed 1
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

from bench_finetune_modes import _step_seconds, _worker
from bench_pretraining_benefit import _prepare_out

from mim3d import example_data
from mim3d.demo import ORGANS, PLANS
from mim3d.labels import LabelTable
from mim3d.runs import read_metrics

HELD_OUT = (86, 100)  # example_ct slices [86, 100): validated, never trained
TRAINING = {"lower": (0, HELD_OUT[0]), "upper": (HELD_OUT[1], None)}  # the training cases: slices [first, stop)
PARTS = {**TRAINING, "held-out": HELD_OUT}
TISSUE_SHIFT_HU = 40  # the second copy of the held-out slices: +40 HU above -100 HU


def main() -> None:
    args = _parse_args()
    plan = PLANS["cpu"]
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    out = _prepare_out(Path(args.out), ".bench-demo-recipe")
    started = time.perf_counter()
    inputs = hold_out(example_data.ensure(), out / "inputs")
    runs = {variant: _run(variant, inputs, out, plan, args) for variant in args.variant}
    results = {"benchmark": "demo_recipe", "quick": args.quick, "seed": args.seed, "threads": args.threads,
               "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "python": platform.python_version()},
               "data": {"train": ["example_ct slices 0-85", "example_ct slices 100-111"],
                        "validation": ["example_ct slices 86-99", f"the same +{TISSUE_SHIFT_HU} HU on tissue"]},
               "plan": {"model": plan["model"] + plan["finetune_model"], "spacing": plan["spacing"],
                        "roi": plan["roi"], "lr": plan["finetune_lr"], "pretrained": None},
               "variants": runs, "seconds": round(time.perf_counter() - started, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(results))


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (new or empty; an earlier result is replaced)")
    parser.add_argument("--variant", action="append", type=_variant,
                        help="CROPSxSTEPS: crops per step and steps (repeatable; default 1x800 and 4x200)")
    parser.add_argument("--seed", type=int, default=0, help="mim3d finetune --seed: initial weights and crops")
    parser.add_argument("--quick", action="store_true", help="one 1x2 variant: checks the path only")
    parser.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of the workers (default 2)")
    args = parser.parse_args()
    args.variant = ["1x2"] if args.quick else args.variant or ["1x800", "4x200"]
    return args


def _variant(text: str) -> str:
    if not re.fullmatch(r"[1-9]\d*x[1-9]\d*", text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected CROPSxSTEPS, e.g. 1x800")
    return text


def hold_out(data: Path, folder: Path) -> dict[str, Path]:
    """The training and validation cases of the hold-out, as `mim3d finetune --images/--labels` reads them."""
    import numpy as np
    import SimpleITK as sitk

    images, labels = folder / "images", folder / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    ct = sitk.Cast(sitk.ReadImage(str(data / "example_ct.nii.gz")), sitk.sitkInt16)
    reference = sitk.ReadImage(str(data / "example_seg_fast_force_split.nii.gz"))
    for name, (first, stop) in PARTS.items():
        sitk.WriteImage(ct[:, :, first:stop], str(images / f"{name}.nii.gz"), useCompression=True)
        sitk.WriteImage(reference[:, :, first:stop], str(labels / f"{name}.nii.gz"), useCompression=True)
    held = ct[:, :, HELD_OUT[0]:HELD_OUT[1]]
    voxels = sitk.GetArrayFromImage(held)
    shifted = sitk.GetImageFromArray(np.where(voxels > -100, voxels + TISSUE_SHIFT_HU, voxels).astype(np.int16))
    shifted.CopyInformation(held)
    sitk.WriteImage(shifted, str(images / "held-out-shifted.nii.gz"), useCompression=True)
    sitk.WriteImage(reference[:, :, HELD_OUT[0]:HELD_OUT[1]], str(labels / "held-out-shifted.nii.gz"),
                    useCompression=True)
    table = folder / "labels.json"
    LabelTable.from_dict({"labels": [{"value": v, "name": n} for v, n in sorted(ORGANS.values())]}).save(table)
    return {"images": images, "labels": labels, "table": table}


def _run(variant: str, inputs: dict[str, Path], out: Path, plan: dict, args) -> dict:
    crops, steps = variant.split("x")
    epochs = str(-(-int(steps) // len(TRAINING)))  # batch 1: an epoch is one step per training case
    run = out / f"finetune-{variant}"
    label_map = json.dumps({str(k): v for k, (v, _) in ORGANS.items()})
    seconds = _worker(["finetune", "--images", str(inputs["images"]), "--labels", str(inputs["labels"]),
                       "--label-table", str(inputs["table"]), "--label-map", label_map, "--val-cases", "held-out",
                       "held-out-shifted", "--arch", "mim-unetr", *plan["model"], *plan["finetune_model"], "--roi",
                       *plan["roi"], "--spacing", *plan["spacing"], "--samples-per-volume", crops, "--lr",
                       plan["finetune_lr"], "--epochs", epochs, "--max-steps", steps,
                       "--val-every", epochs, "--checkpoint-every", steps, "--out", str(run),
                       "--device", "cpu", "--log-every", "1", "--workers", "0", "--seed", str(args.seed)],
                      out / f"finetune-{variant}.json")
    final = [m for m in read_metrics(run) if m.get("kind") == "validation"][-1]
    return {"crops_per_step": int(crops), "steps": final["step"], "mean_dice": final["mean_dice"],
            "dice": final["dice"], "training_seconds": round(sum(_step_seconds(run)), 1), "wall_seconds": seconds,
            **json.loads((out / f"finetune-{variant}.json").read_text())}


if __name__ == "__main__":
    main()
