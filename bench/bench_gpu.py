"""Everything issue 17 measures on a GPU, in one command; prints one JSON object, then a short table on stderr.

    ./run.sh bench gpu                         # the full run on CUDA (about 5-8 minutes on one H100; no network)
    ./run.sh bench gpu --device cpu --quick    # the same code paths with tiny sizes, in the test suite

Sections (keys of the JSON):
- environment: device, driver, CUDA, cuDNN and torch versions, compute capability, the native precision
  (``devices.native_precision``) and the segmentation plans chosen for free memory of 3, 8, 24 and 80 GB;
- pretrain: one optimiser step on the real path (autocast in the native precision, AdamW, GradScaler for fp16) for
  MiM ``base`` at batch 1 and 2 with and without activation checkpointing, MAE and SimMIM ``base``: seconds per step,
  samples/s, peak allocated and reserved memory, FLOPs per step (``torch.utils.flop_counter.FlopCounterMode``,
  forward and backward) and model FLOP utilisation against the device's dense bf16 peak (``PEAK_BF16_TFLOPS``;
  null for a device not in the table);
- profile: the top kernels of one MiM ``base`` step (``torch.profiler``), the share of the depthwise convolutions
  and of copies, and the share of the step the GPU was idle;
- precision: bf16 against float32 on the same crop and masks: every loss term and the gradient norm;
- finetune: one step of mim-unetr ``small`` and ``base`` at 96³ × 4 crops (DiceCE, AdamW);
- segment: whole-CT segmentation by ``base`` mim-unetr (random weights: speed and agreement, not accuracy) of the
  example CT (``$MIM3D_HOME/example-data``, skipped when absent) and of a synthetic 512×512×300 CT, per stage, in
  the native precision and in float32, with the voxel agreement of the two label maps;
- ladder: GPU memory capped with ``torch.cuda.set_per_process_memory_fraction`` (and the plan's budget with it) to
  emulate 8 GB and 3 GB cards: the plan, the out-of-memory retries, label agreement with the uncapped run, and
  whether one fine-tuning step of the GPU demo's recipe (mim-unetr base, 96³ × 4) and one validation pass fit.

``--quick`` keeps every section with tiny models and volumes (seconds to a minute on a CPU). On the CPU the memory
figures are null (the CUDA allocator's counters do not exist there) and the ladder emulates the budgets only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.losses import DiceCELoss
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))
from segment_helpers import model_info  # noqa: E402

from mim3d.devices import GpuProperties, native_precision, use_fast_cuda_kernels  # noqa: E402
from mim3d.example_data import default_cache_dir  # noqa: E402
from mim3d.inference import plans, segment_volume  # noqa: E402
from mim3d.memory import Budget, host_budget  # noqa: E402
from mim3d.models import build_pretrainer, build_segmenter  # noqa: E402
from mim3d.training import engine  # noqa: E402
from mim3d.training.validation import validate_cases  # noqa: E402

GB = 1e9
# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from the vendors' data sheets; the first match wins.
PEAK_BF16_TFLOPS = (("H200", 989), ("H100 PCIe", 756), ("H100", 989), ("A100", 312), ("L40S", 362), ("L4", 121),
                    ("A10", 125), ("RTX 4090", 165), ("RTX 3090", 71))
LR, BETAS = 1e-4, engine.ADAMW_BETAS


@dataclass(frozen=True)
class Sizes:
    """What each section builds: the full run's sizes, or tiny ones (``--quick``)."""

    pretrain_preset: str = "base"
    pretrain_overrides: dict = field(default_factory=dict)  # per method
    mim_runs: tuple = ((1, False), (2, False), (1, True), (2, True))  # (batch, activation checkpointing)
    segmenter_overrides: dict = field(default_factory=dict)  # mim-unetr config fields
    finetune_presets: tuple = ("small", "base")
    finetune_roi: int = 96
    finetune_crops: int = 4
    segment_preset: str = "base"
    segment_roi: int = 96
    synthetic_shape: tuple = (512, 512, 300)  # I, J, K voxels at 0.8 × 0.8 × 1.5 mm
    spacing_mm: tuple = (1.5, 1.5, 2.0)
    steps: int = 5
    example_ct: bool = True
    ladder_gb: tuple = (8, 3)


TINY_HYBRID = dict(embed_dims=(6, 12, 24, 48), depths=(1, 1, 1, 1), num_heads=2)  # sin-cos needs 6 | 48
QUICK = Sizes(pretrain_preset="small",
              pretrain_overrides={"mim": dict(TINY_HYBRID, input_size=32, decoder_dim=48, decoder_depth=1,
                                              decoder_heads=2),
                                  "mae": dict(input_size=32, hidden_size=48, mlp_dim=96, num_layers=1, num_heads=2,
                                              decoder_dim=48, decoder_depth=1, decoder_heads=2),
                                  "simmim": dict(input_size=32, hidden_size=48, mlp_dim=96, num_layers=1,
                                                 num_heads=2)},
              mim_runs=((1, False), (1, True)), segmenter_overrides=TINY_HYBRID, finetune_presets=("small",),
              finetune_roi=64, finetune_crops=1, segment_preset="small", segment_roi=64, synthetic_shape=(96, 96, 40),
              spacing_mm=(6.0, 6.0, 6.0), steps=1, example_ct=False, ladder_gb=(8, 0.5))


# ---- environment --------------------------------------------------------------------------------------------------

def environment(device: torch.device, sizes: Sizes) -> dict:
    info = {"device": "cpu", "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": None, "driver": None,
            "capability": None, "total_gb": None, "precision": native_precision(device) or "fp32"}
    if device.type == "cuda":
        gpu = GpuProperties.of(device)
        info.update(device=gpu.name, cudnn=torch.backends.cudnn.version(), driver=_driver(),
                    capability=f"{gpu.major}.{gpu.minor}", total_gb=round(gpu.total_bytes / GB, 1))
    model = build_segmenter("mim-unetr", 7, sizes.segment_preset, (sizes.segment_roi,) * 3,
                            **sizes.segmenter_overrides)
    footprint = plans.Footprint.of(model, _model_grid(sizes), (sizes.segment_roi,) * 3, 7, False)
    info["segment_plans"] = {f"{gb} GB": plans.choose_plan(device, footprint, budget=_fixed(gb))[1]
                             for gb in (3, 8, 24, 80)}
    return info


def _driver() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def peak_flops(name: str) -> float | None:
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def _fixed(gigabytes: float):
    """The budget of a device with ``gigabytes`` free (the host keeps what it has)."""
    return lambda d: Budget(int(gigabytes * GB), f"{gigabytes} GB emulated")


# ---- steps --------------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"peak_allocated_gb": None, "peak_reserved_gb": None}
    return {"peak_allocated_gb": round(torch.cuda.max_memory_allocated(device) / GB, 2),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / GB, 2)}


def _reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(step, device: torch.device, steps: int, samples: int, peak: float | None) -> dict:
    """Time ``step()`` (one warm-up, then ``steps``), count its FLOPs once, and derive throughput and MFU."""
    _reset(device)
    step()
    seconds = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    memory = _memory(device)
    with FlopCounterMode(display=False) as counter:
        step()
    median, flops = statistics.median(seconds), counter.get_total_flops()
    return {"seconds_per_step": round(median, 4), "samples_per_second": round(samples / median, 3),
            "flops_per_step": int(flops), "mfu": round(flops / median / peak, 4) if peak else None,
            **memory}


def pretrain_step(model, batch: int, device: torch.device, precision: str):
    """One optimiser step of ``model`` (real autocast, AdamW and GradScaler) on fixed random crops."""
    size = model.config.crop_size if hasattr(model.config, "crop_size") else model.config.input_size
    crop = torch.rand(batch, 1, size, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    optimizer = torch.optim.AdamW(engine.param_groups(model, 0.05), lr=LR, betas=BETAS)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    generator = torch.Generator().manual_seed(1)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=engine.AUTOCAST_DTYPES[precision], enabled=precision != "fp32"):
            loss = model(crop, generator=generator)["loss"]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def bench_pretrain(device, sizes: Sizes, precision: str, peak) -> list[dict]:
    runs = [("mim", batch, checkpointing) for batch, checkpointing in sizes.mim_runs]
    runs += [("mae", 1, False), ("simmim", 1, False)]
    results = []
    for method, batch, checkpointing in runs:
        overrides = dict(sizes.pretrain_overrides.get(method, {}))
        if method == "mim":
            overrides["activation_checkpointing"] = checkpointing
        torch.manual_seed(0)
        model = build_pretrainer(method, sizes.pretrain_preset, **overrides).to(device).train()
        result = measure(pretrain_step(model, batch, device, precision), device, sizes.steps, batch, peak)
        results.append({"method": method, "preset": sizes.pretrain_preset, "batch": batch,
                        "activation_checkpointing": checkpointing, "precision": precision, **result})
        del model
    return results


def bench_profile(device, sizes: Sizes, precision: str) -> dict:
    """Top kernels of one MiM step; depthwise convolution, copies and idle shares of the device's busy time."""
    model = build_pretrainer("mim", sizes.pretrain_preset, **sizes.pretrain_overrides.get("mim", {})).to(device)
    step = pretrain_step(model.train(), 1, device, precision)
    step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    _sync(device)
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as profiler:
        step()
        _sync(device)
    wall_us = (time.perf_counter() - start) * 1e6
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in profiler.key_averages() if getattr(e, attribute) > 0]
    busy = sum(getattr(e, attribute) for e in events) or 1.0

    def share(*needles: str) -> float:
        return round(sum(getattr(e, attribute) for e in events if any(n in e.key.lower() for n in needles)) / busy, 4)

    top = sorted(events, key=lambda e: getattr(e, attribute), reverse=True)[:15]
    return {"time": attribute, "step_ms": round(wall_us / 1e3, 2),
            "top": [{"name": e.key[:100], "ms": round(getattr(e, attribute) / 1e3, 3),
                     "share": round(getattr(e, attribute) / busy, 4)} for e in top],
            "depthwise_share": share("depthwise"), "copy_share": share("memcpy", "copy_"),
            "idle_share": round(max(0.0, 1 - busy / wall_us), 4) if device.type == "cuda" else None}


def bench_precision(device, sizes: Sizes) -> dict:
    """bf16 autocast against float32 on the same weights, crop and masks: every loss term and the gradient norm."""
    torch.manual_seed(0)
    model = build_pretrainer("mim", sizes.pretrain_preset, **sizes.pretrain_overrides.get("mim", {})).to(device)
    size = model.config.crop_size
    crop = torch.rand(1, 1, size, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    noise = model.draw_noise(1, torch.Generator().manual_seed(1))
    result = {}
    for name, dtype in (("float32", None), ("bf16", torch.bfloat16)):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            terms = model(crop, noise=noise)
        terms["loss"].backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in model.parameters()
                                                     if p.grad is not None]))
        result[name] = {**{k: round(v.item(), 6) for k, v in terms.items()}, "grad_norm": round(norm.item(), 6)}
    return result


def finetune_step(preset: str, sizes: Sizes, device, precision: str, num_classes: int = 7):
    roi = sizes.finetune_roi
    torch.manual_seed(0)
    model = build_segmenter("mim-unetr", num_classes, preset, (roi,) * 3, **sizes.segmenter_overrides)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(engine.param_groups(model, 0.05), lr=LR, betas=BETAS)
    criterion = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(sizes.finetune_crops, 1, roi, roi, roi, generator=generator).to(device)
    labels = torch.randint(0, num_classes, (sizes.finetune_crops, 1, roi, roi, roi), generator=generator).to(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=engine.AUTOCAST_DTYPES[precision], enabled=precision != "fp32"):
            loss = criterion(model(images).float(), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return model, step


def bench_finetune(device, sizes: Sizes, precision: str, peak) -> list[dict]:
    results = []
    for preset in sizes.finetune_presets:
        _, step = finetune_step(preset, sizes, device, precision)
        result = measure(step, device, sizes.steps, sizes.finetune_crops, peak)
        results.append({"arch": "mim-unetr", "preset": preset, "roi": sizes.finetune_roi,
                        "crops": sizes.finetune_crops, "precision": precision, **result})
    return results


# ---- segmentation -------------------------------------------------------------------------------------------------

def synthetic_ct(shape: tuple[int, int, int]) -> sitk.Image:
    """A body-like CT: an elliptic soft-tissue cylinder with a brighter organ and bone, in air (HU, int16)."""
    i, j, k = np.ogrid[:shape[0], :shape[1], :shape[2]]
    ci, cj = shape[0] / 2, shape[1] / 2
    body = ((i - ci) / (0.42 * shape[0])) ** 2 + ((j - cj) / (0.32 * shape[1])) ** 2 < 1
    organ = ((i - 0.4 * shape[0]) / (0.1 * shape[0])) ** 2 + ((j - cj) / (0.12 * shape[1])) ** 2 < 1
    spine = ((i - ci) / (0.04 * shape[0])) ** 2 + ((j - 0.7 * shape[1]) / (0.04 * shape[1])) ** 2 < 1
    hu = np.full(shape, -1000, np.int16)
    hu[np.broadcast_to(body, shape)] = 40
    hu[np.broadcast_to(organ & (k > shape[2] // 4), shape)] = 120
    hu[np.broadcast_to(spine, shape)] = 700
    hu += np.random.default_rng(0).integers(-20, 20, shape, dtype=np.int16)
    image = sitk.GetImageFromArray(np.ascontiguousarray(hu.transpose(2, 1, 0)))
    image.SetSpacing((0.8, 0.8, 1.5))
    return image


def _model_grid(sizes: Sizes) -> tuple[int, int, int]:
    spacing = (0.8, 0.8, 1.5)
    return tuple(int(n * s / t) for n, s, t in zip(sizes.synthetic_shape, spacing, sizes.spacing_mm, strict=True))


def _segment(image, model, info, device, amp: bool, budget=None) -> tuple[np.ndarray, dict, list[str]]:
    report, messages = {}, []
    options = {"budget": budget} if budget else {}
    labels = segment_volume(image, model, info, device=device, amp=amp, report=report,
                            progress=lambda stage, fraction, message: messages.append(message), **options)
    _sync(device)
    return sitk.GetArrayFromImage(labels), report, messages


def bench_segment(device, sizes: Sizes) -> tuple[list[dict], dict]:
    """Per-stage timings and native/float32 agreement; returns the results, and the model, volumes and native-precision
    labels the ladder compares with."""
    torch.manual_seed(0)
    roi = (sizes.segment_roi,) * 3
    model = build_segmenter("mim-unetr", 7, sizes.segment_preset, roi, **sizes.segmenter_overrides)
    info = model_info(spacing_mm=sizes.spacing_mm, roi_size=roi, arch_preset=sizes.segment_preset, num_classes=7,
                      labels=_seven_labels())
    volumes = {"synthetic": synthetic_ct(sizes.synthetic_shape)}
    example = default_cache_dir() / "example_ct.nii.gz"
    if sizes.example_ct and example.exists():
        volumes["example_ct"] = sitk.ReadImage(str(example))
    results, reference = [], {}
    for name, image in volumes.items():
        _segment(image, model, info, device, True)  # warm-up: kernels chosen, caches filled
        runs = {}
        for precision, amp in (("native", True), ("float32", False)):
            start = time.perf_counter()
            labels, report, _ = _segment(image, model, info, device, amp)
            runs[precision] = (labels, report, time.perf_counter() - start)
        reference[name] = runs["native"][0]
        results.append({"volume": name, "size": list(image.GetSize()), "model_grid": runs["native"][1]["model_grid"],
                        **{p: {"seconds": round(s, 3), "plan": r["plan"], "windows": r["windows"],
                               "stages_s": {k: round(v, 3) for k, v in r["timings_s"].items()}}
                           for p, (_, r, s) in runs.items()},
                        "label_agreement": round(float((runs["native"][0] == runs["float32"][0]).mean()), 6)})
    return results, {"model": model, "info": info, "volumes": volumes, "labels": reference}


def _seven_labels():
    from mim3d.labels import LabelTable

    return LabelTable.from_dict({"labels": [{"value": v, "name": f"organ {v}", "color": [40 * v, 90, 200 - 20 * v]}
                                            for v in range(1, 7)]})


@contextlib.contextmanager
def capped(device: torch.device, gigabytes: float):
    """The GPU capped to ``gigabytes`` (a fraction of its memory); on the CPU nothing is capped."""
    if device.type != "cuda":
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, gigabytes * GB / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()


def bench_ladder(device, sizes: Sizes, segmentation: dict, precision: str) -> list[dict]:
    """Segmentation, a fine-tuning step of the GPU demo recipe and one validation pass under emulated memory caps."""
    results = []
    for gigabytes in sizes.ladder_gb:
        budget = _fixed(gigabytes) if device.type != "cuda" else _capped_budget(device, gigabytes)
        entry = {"cap_gb": gigabytes}
        with capped(device, gigabytes):
            for name, image in segmentation["volumes"].items():
                entry[name] = _attempt(lambda image=image, name=name, budget=budget: _ladder_segment(
                    image, segmentation, device, budget, segmentation["labels"][name]))
            entry["finetune_step"] = _attempt(lambda: finetune_step(sizes.finetune_presets[-1], sizes, device,
                                                                    precision)[1]() or {"fits": True})
            entry["validation"] = _attempt(lambda: _validation_pass(sizes, device, precision))
        results.append(entry)
    return results


def _capped_budget(device, gigabytes: float):
    """What a card of ``gigabytes`` leaves free: the cap less what this process holds (the host: its own budget)."""
    return lambda d: Budget(max(0, int(gigabytes * GB) - torch.cuda.memory_allocated(d)), f"{gigabytes} GB cap") \
        if d.type == "cuda" else host_budget()


def _ladder_segment(image, segmentation, device, budget, reference) -> dict:
    labels, report, messages = _segment(image, segmentation["model"], segmentation["info"], device, True, budget)
    return {"fits": True, "plan": next(m for m in messages if m.startswith("plan: ")), "final_plan": report["plan"],
            "retries": [m for m in messages if "out of memory" in m],
            "labels_identical": bool((labels == reference).all())}


def _validation_pass(sizes: Sizes, device, precision: str) -> dict:
    model, _ = finetune_step(sizes.finetune_presets[-1], sizes, device, precision)
    shape = tuple(int(n * 0.6) for n in _model_grid(sizes))
    image = torch.rand(1, *shape, generator=torch.Generator().manual_seed(2))
    case = {"name": "synthetic", "image": MetaTensor(image), "label": MetaTensor((image > 0.5).long())}
    validate_cases(model, [case], [0], _seven_labels(), (sizes.finetune_roi,) * 3, device, precision)
    return {"fits": True}


def _attempt(run) -> dict:
    try:
        return run()
    except Exception as e:  # noqa: BLE001 - the bench records what failed and goes on
        return {"fits": False, "out_of_memory": plans.is_out_of_memory(e), "error": str(e).splitlines()[0][:300]}


# ---- main ---------------------------------------------------------------------------------------------------------

def table(result: dict) -> str:
    lines = [f"{result['environment']['device']}  precision {result['environment']['precision']}"]
    for r in result["pretrain"]:
        lines.append(f"pretrain {r['method']:7s} b{r['batch']} ckpt={int(r['activation_checkpointing'])}  "
                     f"{r['seconds_per_step']:8.3f} s/step  {r['samples_per_second']:7.2f} samples/s  "
                     f"MFU {r['mfu'] if r['mfu'] is not None else '-'}")
    for r in result["finetune"]:
        lines.append(f"finetune {r['preset']:5s} {r['roi']}³×{r['crops']}  {r['seconds_per_step']:8.3f} s/step")
    for r in result["segment"]:
        lines.append(f"segment {r['volume']:10s} native {r['native']['seconds']:.2f} s, float32 "
                     f"{r['float32']['seconds']:.2f} s, agreement {r['label_agreement']}")
    for r in result["ladder"]:
        fits = {k: v.get("fits") for k, v in r.items() if isinstance(v, dict)}
        lines.append(f"ladder {r['cap_gb']} GB: {fits}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny models and volumes: does every section run")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("bench gpu: no CUDA GPU is usable here; run it on a GPU machine, or --device cpu --quick")
        torch.cuda.set_device(device)
        use_fast_cuda_kernels(device)
    sizes = QUICK if args.quick else Sizes()
    precision, _ = engine.choose_precision(device, None)  # as mim3d pretrain and finetune choose it
    started = time.perf_counter()
    env = environment(device, sizes)
    peak = peak_flops(env["device"]) if device.type == "cuda" else None
    result = {"benchmark": "gpu", "quick": args.quick, "environment": env,
              "pretrain": bench_pretrain(device, sizes, precision, peak),
              "profile": bench_profile(device, sizes, precision),
              "precision": bench_precision(device, sizes),
              "finetune": bench_finetune(device, sizes, precision, peak)}
    result["segment"], segmentation = bench_segment(device, sizes)
    result["ladder"] = bench_ladder(device, sizes, segmentation, precision)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=1))
    print(table(result), file=sys.stderr)


if __name__ == "__main__":
    main()
