"""Segmentation inference: our pipeline (``mim3d.inference.segment_volume``) against plain MONAI sliding-window
inference with the same network and weights, in the same process, on the real example CT (example_ct.nii.gz,
122×101×112 at 3 mm) resampled to the model's spacing; our fast mode; and peak RAM on a synthetic 512×512×300 CT.
Prints one JSON object.

Reference = what a MONAI user writes: the whole volume resampled to the model spacing (the same resampling as ours),
windowed, through ``sliding_window_inference(x, roi, 1, model, overlap=0.25)`` (MONAI's defaults: constant blending,
no foreground crop) on the same device, argmax, and the labels mapped to the input grid with the same
nearest-neighbour step. Ours runs at ``--overlap`` (default 0.25, the reference's) in three ways: as ``mim3d segment``
runs by default (body crop, shared answer for all-air windows, Gaussian blending, uint8 labels, mixed precision where
the device computes it natively); in float32 (``amp=False``); and in float32 with the reference's constant blending,
which isolates the pipeline itself (it should agree exactly). Agreement is the mean Dice over the labels either output
holds, on the input grid (per label in ``dice_per_label``), and the fraction of voxels with the same label.

Agreement needs a trained model: a random network predicts arbitrary labels in the air, which we never compute, so
without ``--model`` (a random small mim-unetr) the timings and memory are meaningful and the agreement is not.

    python bench/bench_segment.py --quick                      # does it run (tiny model, coarse grid, 256² large)
    python bench/bench_segment.py                              # small mim-unetr, 96³ windows, 1.5×1.5×2 mm
    python bench/bench_segment.py --model ~/.mim3d/models/abdomen-small --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))
from bench_pretrain import PeakMemory  # noqa: E402

from mim3d import io  # noqa: E402
from mim3d.example_data import ensure  # noqa: E402
from mim3d.inference import plans, segment_volume  # noqa: E402
from mim3d.inference.geometry import IndexBox, labels_to_input, model_grid  # noqa: E402
from mim3d.labels import LabelTable  # noqa: E402
from mim3d.models import build_segmenter  # noqa: E402
from mim3d.package import ModelInfo, load_package  # noqa: E402
from mim3d.presets import config_to_dict, resolve  # noqa: E402
from mim3d.runtime import keep_freed_memory  # noqa: E402

ABDOMEN = LabelTable.from_dict({"labels": [{"value": v, "name": n} for v, n in enumerate(
    ("spleen", "kidney right", "kidney left", "gallbladder", "liver", "stomach", "pancreas", "aorta"), start=1)]})


def random_model(spacing, roi, overlap, tiny: bool):
    """A small mim-unetr with random weights and its description (8 abdominal labels)."""
    overrides = dict(embed_dims=(12, 24, 48, 96), depths=(1, 1, 1, 1), num_heads=2) if tiny else {}
    torch.manual_seed(0)
    model = build_segmenter("mim-unetr", ABDOMEN.num_classes, preset="small", roi_size=roi, **overrides).eval()
    config = {**config_to_dict(resolve("mim-unetr", "small")),
              **{k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}}
    info = ModelInfo(name="random-small", version="0", labels=ABDOMEN, weights_sha256="",
                     architecture={"arch": "mim-unetr", "preset": "small", "config": config,
                                   "num_classes": ABDOMEN.num_classes, "in_channels": 1},
                     preprocessing={"orientation": "RAS", "spacing_mm": list(spacing),
                                    "intensity_window_hu": [-175, 250], "foreground_crop": True},
                     inference={"roi_size": list(roi), "overlap": overlap, "blend": "gaussian"})
    return model, info


def reference(image: sitk.Image, model, info: ModelInfo, device: torch.device) -> tuple[np.ndarray, int]:
    """Plain MONAI on the whole resampled volume; labels (K, J, I) on the input grid and the windows computed."""
    low, high = info.preprocessing["intensity_window_hu"]
    grid = model_grid(image, info.preprocessing["spacing_mm"], low - 1.0)
    x = np.clip((sitk.GetArrayFromImage(grid).transpose(2, 1, 0) - low) / (high - low), 0, 1)
    calls = []

    def predictor(window):
        calls.append(window.shape[0])
        return model(window)

    with torch.inference_mode():
        logits = sliding_window_inference(torch.from_numpy(np.ascontiguousarray(x, np.float32))[None, None].to(device),
                                          info.roi_size, 1, predictor, overlap=0.25)
        labels = torch.max(logits[0], dim=0).indices.to(torch.uint8).cpu().numpy()
    return labels_to_input(labels, grid, image, IndexBox.whole(image)), sum(calls)


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean and per-label Dice over the labels either map holds, voxel counts of each, and the same-label fraction."""
    values = sorted((set(np.unique(a)) | set(np.unique(b))) - {0})
    per_label = {int(v): {"dice": round(2 * np.count_nonzero((a == v) & (b == v)) / (np.count_nonzero(a == v)
                                                                                        + np.count_nonzero(b == v)), 4),
                          "voxels": [int(np.count_nonzero(a == v)), int(np.count_nonzero(b == v))]} for v in values}
    return {"dice": round(float(np.mean([d["dice"] for d in per_label.values()])), 4) if values else None,
            "dice_per_label": per_label, "voxels_same_label": round(float(np.mean(a == b)), 5)}


def timed(device: torch.device, run):
    """(result, seconds, peak extra memory GiB, peak process RSS GiB) of ``run()``."""
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        result = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    rss = (memory._base + memory.peak) if device.type == "cpu" else psutil.Process().memory_info().rss
    return result, round(seconds, 2), round(memory.peak / 2**30, 3), round(rss / 2**30, 3)


def synthetic_ct(size_ijk: tuple[int, int, int], spacing=(0.8, 0.8, 1.0)) -> sitk.Image:
    """A body-like phantom: an elliptic cylinder of soft tissue with organs, a spine and lungs, in air (int16 HU)."""
    ni, nj, nk = size_ijk
    k, j, i = np.ogrid[:nk, :nj, :ni]
    u, v = (i - ni / 2) / (0.42 * ni), (j - nj / 2) / (0.32 * nj)
    hu = np.full((nk, nj, ni), -1000, np.int16)
    hu[np.broadcast_to(u**2 + v**2 < 1, hu.shape)] = -90  # fat
    hu[np.broadcast_to(u**2 + v**2 < 0.75, hu.shape)] = 40  # soft tissue
    hu[np.broadcast_to(((u + 0.35) / 0.35) ** 2 + (v / 0.5) ** 2 < 1, hu.shape) & (k > nk // 3)] = 90  # "liver"
    hu[np.broadcast_to((u / 0.12) ** 2 + ((v - 0.6) / 0.15) ** 2 < 1, hu.shape)] = 700  # spine
    hu[np.broadcast_to((np.abs(u) - 0.4) ** 2 / 0.08 + v**2 / 0.4 < 1, hu.shape) & (k > 3 * nk // 4)] = -850  # lungs
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(spacing)
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model package folder (default: a random small mim-unetr)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--overlap", type=float, default=0.25, help="our overlap (reference: 0.25)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 6 mm grid, 256×256×150 large volume")
    parser.add_argument("--skip-large", action="store_true", help="skip the 512×512×300 memory measurement")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all runs; times are the median")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: give at least 1 round")
    device = torch.device(args.device)
    allocator_tuned = keep_freed_memory() if device.type == "cpu" else False
    if args.model:
        model, info = load_package(args.model, device)
    elif args.quick:
        model, info = random_model((6.0, 6.0, 6.0), (64, 64, 64), args.overlap, tiny=True)
    else:
        model, info = random_model((1.5, 1.5, 2.0), (96, 96, 96), args.overlap, tiny=False)
    model.to(device)
    ct = io.read_volume(ensure() / "example_ct.nii.gz")
    with torch.inference_mode():
        model(torch.zeros(1, 1, *info.roi_size, device=device))  # warm-up: first-call allocations and kernels

    constant = dataclasses.replace(info, inference={**info.inference, "blend": "constant"})
    ours_runs = (("ours", info, False, True), ("ours_float32", info, False, False),
                 ("ours_float32_constant_blend", constant, False, False), ("ours_fast", info, True, True))
    results, labels, seconds = {}, {}, {}
    for round_index in range(args.repeats):  # every run in turn, so that a slower spell of the machine hits all
        first = round_index == 0  # labels, memory and agreement from the first round; times from every round
        (ref_labels, ref_windows), *cost = timed(device, lambda: reference(ct, model, info, device))
        seconds.setdefault("reference", []).append(cost[0])
        if first:
            results["reference"] = {"peak_extra_gib": cost[1], "windows": ref_windows}
        for name, model_info, fast, amp in ours_runs:
            report = {}
            output, *cost = timed(device, lambda model_info=model_info, fast=fast, amp=amp, report=report:
                                  segment_volume(ct, model, model_info, device=device, fast=fast,
                                                 overlap=args.overlap, amp=amp, report=report))
            seconds.setdefault(name, []).append(cost[0])
            if first:
                labels[name] = sitk.GetArrayFromImage(output)
                results[name] = {
                    "peak_extra_gib": cost[1], "plan": report["plan"], "blend": model_info.inference["blend"],
                    "windows": report["windows"], "empty_windows": report["empty_windows"],
                    "model_grid": report["model_grid"],
                    "timings_s": {k: round(v, 2) for k, v in report["timings_s"].items()},
                    "agreement_with_reference": agreement(labels[name], ref_labels)}
    for name, times in seconds.items():
        results[name].update(seconds=round(float(np.median(times)), 2), seconds_each_round=times)
    for name, *_ in ours_runs[:3]:
        results[f"{name}_time_vs_reference"] = round(results[name]["seconds"] / results["reference"]["seconds"], 3)
    results["ours_agreement_with_ours_float32"] = agreement(labels["ours"], labels["ours_float32"])

    if not args.skip_large:
        size = (256, 256, 150) if args.quick else (512, 512, 300)
        large = synthetic_ct(size)
        report = {}
        _, *cost = timed(device, lambda: segment_volume(large, model, info, device=device, overlap=args.overlap,
                                                        report=report))
        results["large_volume"] = {"size": list(size), "spacing_mm": list(large.GetSpacing()), "seconds": cost[0],
                                   "peak_extra_gib": cost[1], "peak_process_rss_gib": cost[2],
                                   "windows": report["windows"], "model_grid": report["model_grid"]}

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "glibc_keeps_freed_memory": allocator_tuned,
               "mixed_precision": str(plans.amp_dtype(device) or "none").removeprefix("torch.")}
    description = {"name": info.name, "weights": "package" if args.model else "random", "roi": list(info.roi_size),
                   "spacing_mm": info.preprocessing["spacing_mm"], "classes": info.labels.num_classes,
                   "our_overlap": args.overlap, "repeats": args.repeats}
    print(json.dumps({"benchmark": "segment", "machine": machine, "model": description,
                      "input": {"file": "example_ct.nii.gz", "size": list(ct.GetSize())}, "results": results},
                     indent=1))


if __name__ == "__main__":
    main()
