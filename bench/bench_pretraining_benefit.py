"""Does pre-training help fine-tuning on the example data? MiM and MAE pre-training against random initialisation,
each with the same fine-tuning budget, seeds, data and validation schedule. Prints one JSON object (also written to
--out/results.json) and draws --out/pretraining_benefit.png (mean validation Dice against step, one line per arm and
seed).

The data and the CPU plan are the demo's (``mim3d.demo``): a reduced ``small`` MiM encoder (12/24/48/96 channels),
6 mm spacing, 64×64×32 crops, the demo's learning rates, pre-training on the two example CTs (``example_ct`` and the
DICOM series), fine-tuning for six abdominal organs on ``example_ct`` with TotalSegmentator's labels. Unlike the demo,
the DICOM series (another person) is the fine-tuning runs' validation case (``--val-cases``), so ``mim3d finetune``
itself scores it every --val-every steps and writes the Dice of each organ to metrics.jsonl. Its reference is
TotalSegmentator's label map resampled onto the series' grid. It is in the pre-training set too, as in the demo: its
image, never its labels.

Arms, each run through the real ``mim3d pretrain`` and ``mim3d finetune`` commands, per seed:
- ``mim``: ``mim3d pretrain --method mim`` (reduced small encoder), then ``finetune --arch mim-unetr`` from it;
- ``scratch-mim-unetr``: the same mim-unetr from random weights;
- ``mae``: ``mim3d pretrain --method mae --preset small`` (ViT, 192 wide, 12 layers), then ``finetune --arch unetr``;
- ``scratch-unetr``: the same unetr from random weights.
The two architectures differ (hybrid conv/transformer encoder in a Swin-UNETR-style decoder against a plain ViT in
MONAI UNETR), so each pre-training is compared with its own architecture from scratch; MiM against MAE compares
method and architecture together. Both pre-trainings run the same number of steps on the same volumes with the same
learning rate; a MiM step costs far more (21 network passes on a 128³ crop against one on a 64³ crop). One case makes
one step an epoch, so "step" is also the epoch.

Default budget, for a 2-core CPU: one seed, 100 pre-training steps (the demo runs 40), 150 fine-tuning steps per arm
(the demo's), validation every 10 steps: about 26 minutes with nothing else running. Each further seed adds as much.
Workers run with OMP/MKL threads = --threads; with other work on the same cores the steps slow down several times.

    python bench/bench_pretraining_benefit.py --out runs/pretraining-benefit                  # the default budget
    python bench/bench_pretraining_benefit.py --out runs/ppb-2 --seeds 0 1                    # two seeds (~50 min)
    python bench/bench_pretraining_benefit.py --out /tmp/ppb --pretrain-steps 2 --finetune-steps 4 --val-every 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

from mim3d import example_data
from mim3d.demo import CPU_MODEL, ORGANS, PLANS, link_or_copy, prepare_inputs, run_worker
from mim3d.demo_report import on_grid
from mim3d.io import read_volume
from mim3d.protocol import Emitter
from mim3d.runs import read_json, read_metrics

PLAN = PLANS["cpu"]
VALIDATION_CASE = "example_ct_dicom"  # the unseen DICOM series: a DICOM case is named after its folder
# arm -> (pre-training method or None, segmenter arch, model options)
ARMS = {
    "mim": ("mim", "mim-unetr", CPU_MODEL),
    "scratch-mim-unetr": (None, "mim-unetr", CPU_MODEL),
    "mae": ("mae", "unetr", ["--preset", "small"]),
    "scratch-unetr": (None, "unetr", ["--preset", "small"]),
}
COLORS = {"mim-unetr": "tab:blue", "unetr": "tab:orange"}


def main() -> None:
    args = _parse_args()
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)  # the workers inherit it
    out = _prepare_out(Path(args.out))
    started = time.perf_counter()
    inputs = _labelled_inputs(example_data.ensure(), out / "inputs")
    present = _present_organs(inputs["labels"] / f"{VALIDATION_CASE}.nii.gz")
    progress = Emitter(sys.stderr)  # the workers' progress, relayed to the log; stdout carries only the result
    pretrain_runs, finetune_runs = [], []
    for seed in args.seeds:
        for method in sorted({ARMS[a][0] for a in args.arms} - {None}):
            pretrain_runs.append(_pretrain(method, seed, inputs, out, args, progress))
        for arm in (a for a in ARMS if a in args.arms):
            seconds = _finetune(arm, seed, inputs, out, args, progress)
            finetune_runs.append(finetune_record(out, arm, seed, seconds, present))
    results = _results(args, inputs, present, pretrain_runs, finetune_runs, round(time.perf_counter() - started, 1))
    _plot(finetune_runs, out / "pretraining_benefit.png")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(results))


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (new or empty; a previous result is replaced)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="seeds; each pre-trains and fine-tunes every arm (default 0: one seed fits the budget)")
    parser.add_argument("--pretrain-steps", type=int, default=100,
                        help=f"pre-training steps, MiM and MAE alike (default 100; the demo runs {PLAN['pretrain']})")
    parser.add_argument("--finetune-steps", type=int, default=PLAN["finetune"],
                        help=f"fine-tuning steps of every arm (default {PLAN['finetune']}, the demo's)")
    parser.add_argument("--val-every", type=int, default=10, help="validate every N steps, and at the end (default 10)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="default: all four")
    parser.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of the workers (default 2: the cores)")
    return parser.parse_args()


def _prepare_out(out: Path, marker: str = ".bench-pretraining-benefit") -> Path:
    """A new or empty folder, or this benchmark's earlier output (``marker`` in it; replaced); never someone else's
    files."""
    if out.exists() and any(out.iterdir()):
        if not (out / marker).exists():
            sys.exit(f"{out}: folder is not empty and holds no earlier output of this benchmark; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / marker).touch()
    return out


def _labelled_inputs(data: Path, folder: Path) -> dict[str, Path]:
    """The demo's input folders, plus the unseen DICOM series as a second labelled case (the validation case).

    Its TotalSegmentator label map has the series' grid but is stored LAS; `mim3d finetune` wants labels on exactly
    the image grid, so it is resampled onto it (nearest neighbour, identity transform: the same voxels).
    """
    import SimpleITK as sitk

    inputs = prepare_inputs(data, folder)
    link_or_copy(inputs["unseen"], inputs["images"] / VALIDATION_CASE)
    label = on_grid(sitk.ReadImage(str(inputs["unseen_reference"])), read_volume(inputs["unseen"]))
    sitk.WriteImage(label, str(inputs["labels"] / f"{VALIDATION_CASE}.nii.gz"), useCompression=True)
    return inputs


def _present_organs(label: Path) -> list[str]:
    """The organs the validation reference holds: the 4 cm slab misses some (on this series, both kidneys)."""
    import numpy as np
    import SimpleITK as sitk

    ids = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(label)))).tolist())
    return [name for source, (_, name) in sorted(ORGANS.items(), key=lambda o: o[1][0]) if source in ids]


def _pretrain(method: str, seed: int, inputs: dict[str, Path], out: Path, args, progress: Emitter) -> dict:
    run = out / f"seed{seed}" / f"pretrain-{method}"
    model = CPU_MODEL if method == "mim" else ["--preset", "small"]
    seconds = _timed_worker([
        "pretrain", "--data", str(inputs["pretrain"]), "--method", method, *model, "--out", str(run),
        "--epochs", str(max(1, args.pretrain_steps // 2)), "--max-steps", str(args.pretrain_steps),
        "--lr", "1e-4", "--device", "cpu", "--log-every", "1", "--seed", str(seed)],  # lr: the demo's
        progress, f"pretrain {method} seed {seed}")
    losses = [m["loss"] for m in read_metrics(run) if m.get("kind") == "train"]
    return {"method": method, "seed": seed, "run": str(run.relative_to(out)), "seconds": seconds,
            "steps": args.pretrain_steps, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None}


def _finetune(arm: str, seed: int, inputs: dict[str, Path], out: Path, args, progress: Emitter) -> float:
    """Run one arm's `mim3d finetune`; its wall time in seconds."""
    run = out / f"seed{seed}" / f"finetune-{arm}"
    method, arch, model = ARMS[arm]
    pretrained = ["--pretrained", str(out / f"seed{seed}" / f"pretrain-{method}")] if method else []
    label_map = json.dumps({str(k): v for k, (v, _) in ORGANS.items()})
    return _timed_worker([
        "finetune", "--images", str(inputs["images"]), "--labels", str(inputs["labels"]), "--label-table",
        str(inputs["table"]), "--label-map", label_map, "--val-cases", VALIDATION_CASE, "--arch", arch, *model,
        *(PLAN["finetune_model"] if arch == "mim-unetr" else []), *pretrained, "--roi", *PLAN["roi"], "--spacing",
        *PLAN["spacing"], "--samples-per-volume", PLAN["samples"], "--epochs", str(args.finetune_steps),
        "--max-steps", str(args.finetune_steps), "--val-every", str(args.val_every), "--lr", PLAN["finetune_lr"],
        "--out", str(run), "--device", "cpu", "--log-every", "5", "--seed", str(seed),
        "--workers", "0"],  # as the demo: one training case makes every step an epoch
        progress, f"finetune {arm} seed {seed}")


def finetune_record(out: Path, arm: str, seed: int, seconds: float, present: list[str]) -> dict:
    """One fine-tuning run's validation curve, read from its metrics.jsonl.

    Each point has mim3d's mean Dice (over the labels with a value: a kidney predicted where the reference has none
    adds a 0) and ``mean_dice_present``, the mean over the organs the reference holds, which such false positives do
    not move. "final" is the last validation, "best" the one with the highest mim3d mean Dice (checkpoints/best.pt).
    """
    run = out / f"seed{seed}" / f"finetune-{arm}"
    metrics = read_metrics(run)
    curve = [{"step": m["step"], "mean_dice": m["mean_dice"],
              "mean_dice_present": _mean([m["dice"][name] for name in present]), "dice": m["dice"]}
             for m in metrics if m.get("kind") == "validation"]
    scored = [c for c in curve if c["mean_dice"] is not None]
    best = max(scored, key=lambda c: c["mean_dice"]) if scored else None
    losses = [m["loss"] for m in metrics if m.get("kind") == "train"]
    return {"arm": arm, "seed": seed, "pretraining": ARMS[arm][0], "arch": ARMS[arm][1],
            "run": str(run.relative_to(out)), "seconds": seconds, "parameters": _parameters(run), "curve": curve,
            "final": curve[-1] if curve else None, "best": best, "train_loss_last": losses[-1] if losses else None}


def _timed_worker(command: list[str], progress: Emitter, name: str) -> float:
    print(f"[bench] {name}: mim3d {' '.join(command)}", file=sys.stderr, flush=True)
    begin = time.perf_counter()
    run_worker(command, progress, name, (0.0, 1.0))
    seconds = round(time.perf_counter() - begin, 1)
    print(f"[bench] {name}: done in {seconds} s", file=sys.stderr, flush=True)
    return seconds


def _parameters(run: Path) -> int:
    """Trainable parameters of the run's segmenter, rebuilt from its config.json."""
    from mim3d.models import build_segmenter

    arch = read_json(run / "config.json")["model"]
    model = build_segmenter(arch["arch"], arch["num_classes"], arch["preset"], tuple(arch["roi_size"]),
                            arch["in_channels"], **arch["config"])
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _results(args, inputs: dict[str, Path], present: list[str], pretrain_runs: list[dict], finetune_runs: list[dict],
             total_seconds: float) -> dict:
    import torch

    summary = {}
    for arm in args.arms:
        runs = [r for r in finetune_runs if r["arm"] == arm]
        summary[arm] = {f"{key}_{field}": _mean([r[key][field] if r[key] else None for r in runs])
                        for key in ("final", "best") for field in ("mean_dice", "mean_dice_present")}
        summary[arm]["seeds"] = len(runs)
    return {
        "what": "validation Dice on an unseen CT after fine-tuning from MiM / MAE pre-training or from scratch",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": args.threads, "python": platform.python_version(), "torch": torch.__version__},
        "budget": {"seeds": args.seeds, "pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps,
                   "val_every": args.val_every},
        "plan": {"mim_model": " ".join(CPU_MODEL), "mae_model": "--preset small", "spacing_mm": PLAN["spacing"],
                 "roi": PLAN["roi"], "finetune_lr": PLAN["finetune_lr"], "pretrain_lr": "1e-4"},
        "data": {"pretrain": sorted(p.name for p in inputs["pretrain"].iterdir()), "train": "example_ct",
                 "validation": VALIDATION_CASE, "reference": "TotalSegmentator's label maps (predictions)",
                 "labels": [name for _, name in sorted(ORGANS.values())], "in_validation_reference": present},
        "summary_mean_over_seeds": summary,
        "pretrain_runs": pretrain_runs,
        "finetune_runs": finetune_runs,
        "total_seconds": total_seconds,
    }


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return round(statistics.fmean(values), 4) if values else None


def _plot(finetune_runs: list[dict], path: Path) -> None:
    """Mean validation Dice against step: one panel per architecture, pre-trained solid, scratch dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = [a for a in COLORS if any(r["arch"] == a for r in finetune_runs)]
    figure, axes = plt.subplots(1, len(archs), figsize=(4.2 * len(archs), 3.2), squeeze=False, sharey=True)
    for axis, arch in zip(axes[0], archs, strict=True):
        for r in (r for r in finetune_runs if r["arch"] == arch):
            points = [c for c in r["curve"] if c["mean_dice"] is not None]
            axis.plot([c["step"] for c in points], [c["mean_dice"] for c in points],
                      "o-" if r["pretraining"] else "s--", color=COLORS[arch] if r["pretraining"] else "tab:gray",
                      alpha=0.9 if r["seed"] == min(x["seed"] for x in finetune_runs) else 0.55, markersize=3,
                      label=f"{r['arm']} seed {r['seed']}")
        axis.set_title(arch)
        axis.set_xlabel("fine-tuning step (= epoch)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    axes[0][0].set_ylabel("mean Dice, unseen CT")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


if __name__ == "__main__":
    main()
