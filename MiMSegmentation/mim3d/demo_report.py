"""The demo's report: per-organ Dice and volumes on the unseen scan, overlays at several slices, training curves, the
timings and the machine, in report.json and report.md."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .io import read_volume
from .package import read_model_json
from .runs import read_metrics

CROP_CENTRES_TEXT = {"classes": "on each organ and the background equally often",
                     "pos-neg": "half on organs, half elsewhere"}  # mim3d finetune --crops
SMOOTH_STEPS = 10  # fine-tuning loss: running mean over this many steps (one case: a step is an epoch)


def write_report(out: Path, segmentation: Path, inputs: dict[str, Path], organs: dict[int, tuple[int, str]],
                 timings: dict[str, float], plan: dict, total_seconds: float) -> dict:
    ct = read_volume(inputs["unseen"])
    per_organ, predicted, reference = score_organs(sitk.ReadImage(str(segmentation)),
                                                   sitk.ReadImage(str(inputs["unseen_reference"])), ct, organs)
    dice = {name: o["dice"] for name, o in per_organ.items()}
    scored = [d for d in dice.values() if d is not None]
    present = [o["dice"] for o in per_organ.values() if o["reference_ml"] > 0]
    model = read_model_json(out / "finetune" / "model")
    _draw_overlays(out, sitk.GetArrayFromImage(ct), predicted, reference, model.labels, ct.GetSpacing())
    _draw_training(out)
    machine = _machine()
    report = {
        "what": "MiM pre-training -> mim-unetr fine-tuning on one CT -> segmentation of an unseen CT (DICOM)",
        "model": " ".join(plan["model"]), "spacing_mm": plan["spacing"],
        "plan": {"crop_voxels": plan["roi"], "crops_per_step": int(plan["samples"]), "crops_centred": plan["crops"],
                 "finetune_lr": plan["finetune_lr"], "keep_largest": plan["keep_largest"],
                 "recipe": plan["recipe"]},
        "steps": {"pretrain": plan["pretrain"], "finetune": plan["finetune"]},
        "timings_seconds": {**timings, "total": total_seconds},
        "machine": machine,
        "training": {"finetune_validation_dice": model.provenance.get("validation_dice"),
                     "pretrained_from": model.provenance.get("pretrained_from")},
        "unseen_scan": {"input": str(inputs["unseen"]), "grid": _grid(ct), "segmentation_grid": _grid(
            sitk.ReadImage(str(segmentation))), "reference": str(inputs["unseen_reference"]), "dice": dice,
            "organs": per_organ, "mean_dice": round(float(np.mean(scored)), 4) if scored else None,
            "mean_dice_reference_organs": round(float(np.mean(present)), 4) if present else None},
        "files": {"segmentation": segmentation.name, "model": "finetune/model", "overlays":
                  ["overlay_axial.png", "overlay_coronal.png"], "training_plot": "training.png"},
        "budget": _budget_sentence(machine),
        "caveat": "One training case and one test case; the reference labels are TotalSegmentator's predictions.",
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "report.md").write_text(_markdown(report), encoding="utf-8")
    return report


def score_organs(segmentation: sitk.Image, reference: sitk.Image, grid: sitk.Image,
                 organs: dict[int, tuple[int, str]]) -> tuple[dict, np.ndarray, np.ndarray]:
    """Per organ: Dice, reference and predicted volume (ml) on ``grid``, with ``reference`` in the TotalSegmentator
    ids that ``organs`` maps to our values; and the two label arrays on the grid, (K, J, I), in our values."""
    predicted = sitk.GetArrayFromImage(on_grid(segmentation, grid))
    expected = _remap(sitk.GetArrayFromImage(on_grid(reference, grid)), organs)
    ml = float(np.prod(grid.GetSpacing())) / 1000.0
    per_organ = {name: {"dice": _dice(predicted == value, expected == value),
                        "reference_ml": round(int((expected == value).sum()) * ml, 1),
                        "predicted_ml": round(int((predicted == value).sum()) * ml, 1)}
                 for value, name in sorted(organs.values())}
    return per_organ, predicted, expected


def on_grid(image: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """A label map resampled (nearest neighbour, identity transform) onto the reference grid in physical space."""
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def _remap(labels: np.ndarray, organs: dict[int, tuple[int, str]]) -> np.ndarray:
    table = np.zeros(256, dtype=np.uint8)
    for source, (value, _) in organs.items():
        table[source] = value
    return table[labels]


def _dice(a: np.ndarray, b: np.ndarray) -> float | None:
    total = int(a.sum() + b.sum())
    return round(2 * int(np.logical_and(a, b).sum()) / total, 4) if total else None


def _grid(image: sitk.Image) -> dict:
    return {"size": list(image.GetSize()), "spacing": [round(s, 6) for s in image.GetSpacing()],
            "origin": [round(o, 6) for o in image.GetOrigin()], "direction": [round(d, 6) for d in
                                                                             image.GetDirection()]}


def _machine() -> dict:
    """The CPU model and core count (and the GPU, if torch sees one), for the timings to mean something."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text(encoding="utf-8").splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "gpu": gpu}


def _budget_sentence(machine: dict) -> str:
    where = f"one {machine['gpu']}" if machine["gpu"] else f"{machine['cores']} CPU cores"
    return (f"Minutes of {where} and one labelled scan can show that the whole path learns the large organs well "
            "enough to find them in another person's scan; they cannot show accuracy on small structures, across "
            "patients and scanners, or the benefit of pre-training, which the paper measures with thousands of scans.")


def _slices(n: int, count: int = 3) -> list[int]:
    """``count`` evenly spread slice indices inside 0..n-1, away from the ends."""
    return sorted({int(round(n * (i + 1) / (count + 1))) for i in range(count)})


def _draw_overlays(out: Path, ct: np.ndarray, predicted: np.ndarray, reference: np.ndarray, labels,
                   spacing: tuple[float, float, float]) -> None:
    """Axial slices across the scan and coronal slices across the reference organs, (K, J, I) arrays, each row the
    same slice with mim3d's and the reference's labels, drawn at the physical aspect."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    colors = np.zeros((256, 4))
    for label in labels:
        colors[label.value] = [*(c / 255 for c in label.color), 0.45]
    cmap = ListedColormap(colors)
    organs = np.argwhere(reference > 0)
    lo, hi = (organs.min(axis=0), organs.max(axis=0)) if len(organs) else (np.zeros(3, int), np.array(ct.shape) - 1)
    views = {"axial": ([int(k) for k in _slices(ct.shape[0])], lambda v, k: v[k], spacing[1] / spacing[0]),
             "coronal": ([int(lo[1] + j) for j in _slices(hi[1] - lo[1] + 1)], lambda v, j: v[:, j, :][::-1],
                         spacing[2] / spacing[0])}  # superior at the top
    for view, (positions, cut, aspect) in views.items():
        rows = [cut(ct, p).shape for p in positions]  # each panel about 4.4 inches wide, plus its title
        height = sum(0.4 + 4.4 * aspect * n / m for n, m in rows)
        figure, axes = plt.subplots(len(positions), 2, figsize=(9, height), squeeze=False)
        for row, position in zip(axes, positions, strict=True):
            for axis, (title, labelmap) in zip(row, (("mim3d", predicted), ("reference", reference)), strict=True):
                axis.imshow(np.clip(cut(ct, position), -175, 250), cmap="gray", aspect=aspect)
                axis.imshow(cut(labelmap, position), cmap=cmap, vmin=0, vmax=255, interpolation="nearest",
                            aspect=aspect)
                axis.set_title(f"{title}, {view} slice {position}", fontsize=9)
                axis.axis("off")
        figure.tight_layout()
        figure.savefig(out / f"overlay_{view}.png", dpi=80)
        plt.close(figure)


def _running_mean(values: list[float], window: int) -> np.ndarray:
    cumulative = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (cumulative[1:] - cumulative[np.arange(1, len(values) + 1) - counts]) / counts


def _draw_training(out: Path) -> None:
    """Pre-training: the loss per epoch (the mean over the scans, so scan-to-scan differences cancel); fine-tuning:
    the loss per step, faint, and its running mean over ``SMOOTH_STEPS``, with the validation Dice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, run in zip(axes, ("pretrain", "finetune"), strict=True):
        metrics = read_metrics(out / run)
        train = [m for m in metrics if m.get("kind") == "train"]
        if run == "pretrain":  # logged every step: grouped by epoch here, so a last, partial epoch counts too
            by_epoch: dict[int, list[float]] = {}
            for m in train:
                by_epoch.setdefault(math.ceil(m["epoch"]), []).append(m["loss"])
            axis.plot(list(by_epoch), [float(np.mean(v)) for v in by_epoch.values()], "o-",
                      label="loss, mean per epoch")
            axis.set_xlabel("epoch (one step per scan)")
        else:
            steps, losses = [m["step"] for m in train], [m["loss"] for m in train]
            axis.plot(steps, losses, color="tab:blue", alpha=0.3, label="loss per step")
            axis.plot(steps, _running_mean(losses, SMOOTH_STEPS), color="tab:blue",
                      label=f"running mean of {SMOOTH_STEPS}")
            axis.set_xlabel("step")
        axis.set_title(run)
        validation = [m for m in metrics if m.get("kind") == "validation" and m.get("mean_dice") is not None]
        if validation:
            twin = axis.twinx()
            twin.plot([m["step"] for m in validation], [m["mean_dice"] for m in validation], "o-", color="tab:green",
                      label="validation mean Dice (training scan)")
            twin.set_ylim(0, 1)
            twin.set_ylabel("mean Dice")
            twin.legend(loc="center right")
        axis.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(out / "training.png", dpi=80)
    plt.close(figure)


def _kept_text(labels: list[str]) -> str:
    return f"; segmentation keeps only the largest piece of {' and '.join(labels)}" if labels else ""


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _markdown(report: dict) -> str:
    unseen, plan, machine = report["unseen_scan"], report["plan"], report["machine"]
    rows = "\n".join(f"| {name} | {_number(o['dice'])} | {o['reference_ml']:.0f} | {o['predicted_ml']:.0f} |"
                     for name, o in unseen["organs"].items())
    t = report["timings_seconds"]
    steps = report["steps"]
    device = machine["gpu"] or f"{machine['cpu']}, {machine['cores']} cores"
    return (f"# mim3d demo\n\n{report['what']} (`{report['model']}`, {steps['pretrain']} pre-training "
            f"and {steps['finetune']} fine-tuning steps of {plan['crops_per_step']} crop(s) of "
            f"{'×'.join(plan['crop_voxels'])} voxels at {'×'.join(report['spacing_mm'])} mm, centred "
            f"{CROP_CENTRES_TEXT[plan['crops_centred']]}, lr {plan['finetune_lr']}"
            f"{_kept_text(plan['keep_largest'])}).\n\n"
            f"Timings on {device}: pre-training {t['pretrain']} s, fine-tuning {t['finetune']} s, segmentation "
            f"{t['segment']} s, total {t['total']} s.\n\n"
            "## Dice on the unseen scan\n\n| organ | Dice | reference volume (ml) | predicted volume (ml) |\n"
            f"|---|---|---|---|\n{rows}\n"
            f"| **mean** (organs either holds) | **{_number(unseen['mean_dice'])}** | | |\n"
            f"| **mean** (organs the reference holds) | **{_number(unseen['mean_dice_reference_organs'])}** | | |\n\n"
            f"The recipe: {plan['recipe']}\n\n{report['budget']}\n\n{report['caveat']}\n\n"
            "![axial](overlay_axial.png)\n![coronal](overlay_coronal.png)\n![training](training.png)\n")
