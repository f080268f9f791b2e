"""Training-side throughput: data loading with and without the pre-processing cache, and fine-tuning steps per second.
Prints one JSON object.

Data loading, on the real example CT (``mim3d.example_data``), items read directly from the dataset in this process:
- pre-training (``pretraining_dataset``): example_ct.nii.gz (122×101×112 at 3 mm) and the example DICOM series
  (found by ``discover_volumes``), crop 128 (``small``) and 192 (``base``). One item = one crop (1, S, S, S).
- fine-tuning (``finetune_train_dataset``): example_ct.nii.gz with its TotalSegmentator labels (liver -> 1,
  spleen -> 2), 1.5×1.5×2 mm, ROI 96, 4 crops per item; the item is collated with ``list_data_collate`` as the
  training loop's DataLoader does. One item = one case = 4 crops.
Three ways each: ``no_cache`` (cache_dir None: read, orient, resample, window, pad on every item); ``cold_cache``
(a fresh empty cache folder per pass over the volumes, so every timed item builds and writes its entry, hashing the
source files included); ``warm_cache`` (a new dataset on the filled folder, as in the next epoch of a later run:
memory-mapped entries, crop and augmentation only). Each times ``--items`` items (epochs advance with ``set_epoch``
so the crops differ) after one untimed warm-up item; the median is reported. The files sit in the page cache, so
disk speed is not measured.

Fine-tuning steps: ``build_segmenter`` (mim-unetr and unetr, ``--presets``, ``--rois``), a batch of 4 random crops
(1 case × 4 samples, the §9.5 recipe) with random labels of ``--num-classes`` classes; forward, DiceCE
(``to_onehot_y``, softmax, as ``mim3d.training.finetune``), backward, AdamW step with gradient clipping
(``ClippedAdamW``, weight decay on weights only). Precision as ``mim3d finetune`` chooses it (fp32 on the CPU,
bf16/fp16 autocast on CUDA unless ``--no-amp``). One warm-up step, ``--steps`` timed steps (median), then the peak
extra memory of one more step (``bench_pretrain.PeakMemory``).

    python bench/bench_training.py --quick                 # does it run (2 items, 1 step, small at ROI 64 only)
    python bench/bench_training.py                         # CPU: data 128/192, steps small (64, 96) and base (96)
    python bench/bench_training.py --device cuda --skip-data
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from monai.data import list_data_collate
from monai.losses import DiceCELoss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import PeakMemory  # noqa: E402

from mim3d.data import discover_volumes  # noqa: E402
from mim3d.data.finetune_sources import FinetuneCase  # noqa: E402
from mim3d.data.transforms import FinetunePreprocessing, finetune_train_dataset, pretraining_dataset  # noqa: E402
from mim3d.example_data import ensure  # noqa: E402
from mim3d.models import build_segmenter  # noqa: E402
from mim3d.runtime import keep_freed_memory  # noqa: E402
from mim3d.training import engine  # noqa: E402
from mim3d.training.finetune import ClippedAdamW  # noqa: E402

PRETRAIN_CROPS = {"small": 128, "base": 192}  # PretrainPreprocessing.crop_size = 2 · input_size of MiM (§8.2)
FINETUNE_LABELS = {5: 1, 1: 2}  # TotalSegmentator ids in example_seg_fast_force_split: liver 5, spleen 1
FINETUNE_SPACING = (1.5, 1.5, 2.0)
# §9.5 recipe, as mim3d.training.finetune sets it up
LR, BETAS, WEIGHT_DECAY, CLIP_GRAD = 1e-4, (0.9, 0.999), 1e-5, 5.0


# ---- data loading ---------------------------------------------------------------------------------------------------

def _summary(timed: list[tuple[int, float]], per_item: int, names: list[str]) -> dict:
    """Median seconds per item (and its inverse), the mean over all timed items, and with several volumes the median
    of each: their sizes differ, so the overall median mixes them."""
    seconds = [s for _, s in timed]
    median = statistics.median(seconds)
    out = {"seconds_per_item": round(median, 4), "items_per_second": round(1 / median, 3)}
    if per_item > 1:
        out["crops_per_second"] = round(per_item / median, 3)
    out["mean_seconds_per_item"] = round(statistics.fmean(seconds), 4)
    if len(names) > 1:
        out["per_volume_seconds"] = {name: round(statistics.median(s for i, s in timed if i == j), 4)
                                     for j, name in enumerate(names) if any(i == j for i, _ in timed)}
    return {**out, "all_seconds": [round(s, 4) for s in seconds]}


def _folder_mib(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20, 1)


def _time_items(make_dataset, items: int, cache_dirs: list[Path | None], fetch) -> list[tuple[int, float]]:
    """(index, seconds) of `items` items: passes over the dataset, pass p on a new dataset over cache_dirs[p] (the
    last one reused when the list runs out), epoch p + 1, so every pass draws other crops."""
    seconds, p = [], 0
    while len(seconds) < items:
        dataset = make_dataset(cache_dirs[min(p, len(cache_dirs) - 1)])
        dataset.set_epoch(p + 1)  # epoch 0 is the warm-up's
        for index in range(len(dataset)):
            start = time.perf_counter()
            fetch(dataset, index)
            seconds.append((index, time.perf_counter() - start))
            if len(seconds) == items:
                break
        p += 1
    return seconds


def _three_ways(make_dataset, items: int, fetch, per_item: int, names: list[str], tmp: Path, label: str) -> dict:
    """no_cache, cold_cache and warm_cache timings of one dataset configuration."""
    warm_up = make_dataset(None)
    warm_up.set_epoch(0)
    fetch(warm_up, 0)  # one-time lazy initialisation (MONAI transforms, SimpleITK, DICOM codecs) is not timed
    n = len(warm_up)
    result = {"no_cache": _summary(_time_items(make_dataset, items, [None], fetch), per_item, names)}
    passes = -(-items // n)
    cold_dirs = [Path(tempfile.mkdtemp(prefix=f"{label}-cold{p}-", dir=tmp)) for p in range(passes)]
    result["cold_cache"] = _summary(_time_items(make_dataset, items, cold_dirs, fetch), per_item, names)
    result["warm_cache"] = _summary(_time_items(make_dataset, items, [cold_dirs[-1]], fetch), per_item, names)
    result["cache_mib"] = _folder_mib(cold_dirs[-1])
    result["warm_speedup_vs_no_cache"] = round(result["no_cache"]["seconds_per_item"]
                                               / result["warm_cache"]["seconds_per_item"], 1)
    return result


def bench_data(presets: list[str], items: int, finetune_roi: int, tmp: Path) -> list[dict]:
    folder = ensure()
    wanted = {folder / "example_ct.nii.gz", folder / "example_ct_dicom"}
    volumes = [v for v in discover_volumes([folder]).volumes if v.path in wanted]
    if len(volumes) != len(wanted):
        raise SystemExit(f"{folder}: expected example_ct.nii.gz and the DICOM series, found {volumes}")
    described = [{"name": v.name, "kind": v.kind, "size": list(v.size), "spacing_mm": [round(s, 3) for s in v.spacing]}
                 for v in volumes]
    results = []
    for preset in presets:
        crop = PRETRAIN_CROPS[preset]

        def make(cache_dir, crop=crop):
            return pretraining_dataset(volumes, crop, cache_dir, seed=0)

        timings = _three_ways(make, items, lambda d, i: d[i], 1, [v.name for v in volumes], tmp,
                              f"pretrain{crop}")
        results.append({"dataset": "pretraining", "preset": preset, "crop": crop, "volumes": described,
                        "items": items, **timings})

    settings = FinetunePreprocessing(spacing_mm=FINETUNE_SPACING, roi=(finetune_roi,) * 3, num_samples=4)
    case = FinetuneCase(folder / "example_ct.nii.gz", folder / "example_seg_fast_force_split.nii.gz", "example_ct",
                        label_map=FINETUNE_LABELS)

    def make_finetune(cache_dir):
        return finetune_train_dataset([case], settings, cache_dir, seed=0)

    timings = _three_ways(make_finetune, items, lambda d, i: list_data_collate([d[i]]), settings.num_samples,
                          [case.name], tmp, "finetune")
    results.append({"dataset": "finetune_train", "case": case.name, "roi": finetune_roi,
                    "spacing_mm": list(FINETUNE_SPACING), "samples_per_item": settings.num_samples,
                    "label_map": {str(k): v for k, v in FINETUNE_LABELS.items()}, "items": items, **timings})
    return results


# ---- fine-tuning steps ----------------------------------------------------------------------------------------------

def bench_step(arch: str, preset: str, roi: int, batch: int, num_classes: int, steps: int, device: torch.device,
               precision: str) -> dict:
    torch.manual_seed(0)
    model = build_segmenter(arch, num_classes, preset, (roi,) * 3).to(device).train()
    optimizer = ClippedAdamW(engine.param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS, max_norm=CLIP_GRAD)
    criterion = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast_dtype = engine.AUTOCAST_DTYPES[precision]
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.rand(batch, 1, roi, roi, roi, generator=generator).to(device),
                torch.randint(0, num_classes, (batch, 1, roi, roi, roi), generator=generator).to(device))
               for _ in range(steps + 1)]

    def step(images, labels):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=precision != "fp32"):
            loss = criterion(model(images).float(), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step(*batches[0])  # warm-up
    seconds = []
    for images, labels in batches[1:]:
        start = time.perf_counter()
        step(images, labels)
        seconds.append(time.perf_counter() - start)
    with PeakMemory(device) as memory:
        step(*batches[0])
    median = statistics.median(seconds)
    return {"arch": arch, "preset": preset, "roi": roi, "batch_crops": batch, "num_classes": num_classes,
            "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2), "precision": precision,
            "seconds_per_step": round(median, 3), "steps_per_second": round(1 / median, 4),
            "crops_per_second": round(batch / median, 3), "all_seconds": [round(s, 3) for s in seconds],
            "peak_memory_gib": round(memory.peak / 2**30, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="does it run: 2 items, 1 timed step, preset small only, steps at ROI 64 only")
    parser.add_argument("--device", default="cpu", help="device of the fine-tuning steps (cpu, cuda)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="autocast on CUDA (default: on, as mim3d finetune; always fp32 on the CPU)")
    parser.add_argument("--items", type=int, default=8, help="timed items per data-loading way (median)")
    parser.add_argument("--steps", type=int, default=3, help="timed fine-tuning steps per model (after one warm-up)")
    parser.add_argument("--presets", nargs="+", default=["small", "base"], choices=["small", "base"])
    parser.add_argument("--archs", nargs="+", default=["mim-unetr", "unetr"], choices=["mim-unetr", "unetr"])
    parser.add_argument("--rois", type=int, nargs="+", default=None,
                        help="fine-tuning step ROIs (default: 64 and 96 for small, 96 for base)")
    parser.add_argument("--finetune-roi", type=int, default=96, help="ROI of the fine-tuning data-loading benchmark")
    parser.add_argument("--batch", type=int, default=4, help="crops per step (1 case × 4 samples in the recipe)")
    parser.add_argument("--num-classes", type=int, default=14, help="segmenter outputs (BTCV: 13 organs + background)")
    parser.add_argument("--skip-data", action="store_true", help="fine-tuning steps only")
    parser.add_argument("--skip-steps", action="store_true", help="data loading only")
    parser.add_argument("--tmp", type=Path, default=None, help="where the temporary cache folders go")
    args = parser.parse_args()
    if args.quick:
        args.items, args.steps, args.presets, args.rois = 2, 1, ["small"], [64]
    device = torch.device(args.device)
    precision, _ = engine.choose_precision(device, args.amp)
    allocator_tuned = keep_freed_memory()
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "glibc_keeps_freed_memory": allocator_tuned}
    out = {"benchmark": "training", "machine": machine, "quick": args.quick}
    if not args.skip_data:
        with tempfile.TemporaryDirectory(prefix="mim3d-bench-cache-", dir=args.tmp) as tmp:
            out["data_loading"] = bench_data(args.presets, args.items, args.finetune_roi, Path(tmp))
    if not args.skip_steps:
        out["finetune_steps"] = [
            bench_step(arch, preset, roi, args.batch, args.num_classes, args.steps, device, precision)
            for preset in args.presets for roi in (args.rois or ([64, 96] if preset == "small" else [96]))
            for arch in args.archs]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
