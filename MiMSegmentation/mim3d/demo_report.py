"""The demo's report: per-organ Dice of the segmentation of the unseen scan, overlays, training curves, report.json
and report.md."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .io import read_volume
from .package import read_model_json
from .runs import read_metrics


def write_report(out: Path, segmentation: Path, inputs: dict[str, Path], organs: dict[int, tuple[int, str]],
                 timings: dict[str, float], plan: dict, total_seconds: float) -> dict:
    ct = read_volume(inputs["unseen"])
    predicted = sitk.GetArrayFromImage(on_grid(sitk.ReadImage(str(segmentation)), ct))  # (K, J, I)
    reference = _remap(sitk.GetArrayFromImage(on_grid(sitk.ReadImage(str(inputs["unseen_reference"])), ct)), organs)
    dice = {name: _dice(predicted == value, reference == value) for value, name in sorted(organs.values())}
    scored = [d for d in dice.values() if d is not None]
    model = read_model_json(out / "finetune" / "model")
    _draw_overlays(out, sitk.GetArrayFromImage(ct), predicted, reference, model.labels, ct.GetSpacing())
    _draw_training(out)
    report = {
        "what": "MiM pre-training -> mim-unetr fine-tuning on one CT -> segmentation of an unseen CT (DICOM)",
        "model": " ".join(plan["model"]), "spacing_mm": plan["spacing"],
        "steps": {"pretrain": plan["pretrain"], "finetune": plan["finetune"]},
        "timings_seconds": {**timings, "total": total_seconds},
        "training": {"finetune_validation_dice": model.provenance.get("validation_dice"),
                     "pretrained_from": model.provenance.get("pretrained_from")},
        "unseen_scan": {"input": str(inputs["unseen"]), "grid": _grid(ct), "segmentation_grid": _grid(
            sitk.ReadImage(str(segmentation))), "reference": str(inputs["unseen_reference"]), "dice": dice,
            "mean_dice": round(float(np.mean(scored)), 4) if scored else None},
        "files": {"segmentation": segmentation.name, "model": "finetune/model", "overlays":
                  ["overlay_axial.png", "overlay_coronal.png"], "training_plot": "training.png"},
        "caveat": "One training case and one test case; the reference labels are TotalSegmentator's predictions.",
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "report.md").write_text(_markdown(report), encoding="utf-8")
    return report


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


def _draw_overlays(out: Path, ct: np.ndarray, predicted: np.ndarray, reference: np.ndarray, labels,
                   spacing: tuple[float, float, float]) -> None:
    """Axial and coronal slices through the reference liver, (K, J, I) arrays, drawn at their physical aspect."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    colors = np.zeros((256, 4))
    for label in labels:
        colors[label.value] = [*(c / 255 for c in label.color), 0.45]
    cmap = ListedColormap(colors)
    liver = np.argwhere(reference == 1)
    centre = liver.mean(axis=0).astype(int) if len(liver) else np.array(ct.shape) // 2
    views = {"axial": (lambda v: v[centre[0]], spacing[1] / spacing[0]),
             "coronal": (lambda v: v[:, centre[1], :][::-1], spacing[2] / spacing[0])}  # superior at the top
    for view, (cut, aspect) in views.items():
        figure, axes = plt.subplots(1, 2, figsize=(10, 5.5))
        for axis, (title, labelmap) in zip(axes, (("mim3d", predicted), ("reference", reference)), strict=True):
            axis.imshow(np.clip(cut(ct), -175, 250), cmap="gray", aspect=aspect)
            axis.imshow(cut(labelmap), cmap=cmap, vmin=0, vmax=255, interpolation="nearest", aspect=aspect)
            axis.set_title(f"{title} ({view})")
            axis.axis("off")
        figure.tight_layout()
        figure.savefig(out / f"overlay_{view}.png", dpi=80)
        plt.close(figure)


def _draw_training(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, run in zip(axes, ("pretrain", "finetune"), strict=True):
        metrics = read_metrics(out / run)
        train = [m for m in metrics if m.get("kind") == "train"]
        axis.plot([m["step"] for m in train], [m["loss"] for m in train], label="training loss")
        axis.set_xlabel("step")
        axis.set_title(f"{run}")
        validation = [m for m in metrics if m.get("kind") == "validation" and m.get("mean_dice") is not None]
        if validation:
            twin = axis.twinx()
            twin.plot([m["step"] for m in validation], [m["mean_dice"] for m in validation], "o-", color="tab:green",
                      label="validation mean Dice")
            twin.set_ylim(0, 1)
            twin.set_ylabel("mean Dice")
        axis.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(out / "training.png", dpi=80)
    plt.close(figure)


def _markdown(report: dict) -> str:
    rows = "\n".join(f"| {name} | {'–' if d is None else f'{d:.3f}'} |"
                     for name, d in report["unseen_scan"]["dice"].items())
    t = report["timings_seconds"]
    mean = report["unseen_scan"]["mean_dice"]
    steps = report["steps"]
    return (f"# mim3d demo\n\n{report['what']} (`{report['model']}`, {steps['pretrain']} pre-training "
            f"and {steps['finetune']} fine-tuning steps).\n\n"
            f"Timings: pre-training {t['pretrain']} s, fine-tuning {t['finetune']} s, segmentation {t['segment']} s, "
            f"total {t['total']} s.\n\n## Dice on the unseen scan\n\n| organ | Dice |\n|---|---|\n{rows}\n"
            f"| **mean** | **{'–' if mean is None else f'{mean:.3f}'}** |\n\n{report['caveat']}\n\n"
            "![axial](overlay_axial.png)\n![coronal](overlay_coronal.png)\n![training](training.png)\n")
