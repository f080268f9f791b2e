"""What the training panel asks for, as `mim3d pretrain` / `mim3d finetune` command lines. Standard library only.

- `PretrainSettings` and `FinetuneSettings`: the panel's choices; `to_args()` gives the exact worker options and
  `check()` the problems a person must fix first, in plain words (an empty list: ready to start).
- `resume_args(run_dir)`: the options that continue a stopped or killed run.
- `preview_args(folders)` / `summarize_preview(event)`: the scan-folder preview, computed by the worker
  (`mim3d pretrain --data DIR --check-data`) and shown as a few lines.
- `estimate_time(settings, num_volumes, device)`: a rough wall time from the step times in docs/BENCHMARKS.md.

Defaults are those of the command line, so a setting left alone means what `mim3d --help` says.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from mim3d.runs import RunDir, read_json, read_status

METHODS = ("mim", "mae", "simmim")
ARCHS = ("mim-unetr", "unetr")
PRESETS = ("small", "base")
DEVICES = ("auto", "cpu", "cuda")
ENCODER_ARCH = {"mim": "mim-unetr", "mae": "unetr", "simmim": "unetr"}  # MIM_METHOD §9.4, §14.2
METHOD_NOTES = {  # one line each, for the panel's method chooser
    "mim": "MiM (Mask in Mask): masks each scan at three nested levels, restores every level and aligns them; "
           "the strongest encoder and the slowest to train. Fine-tunes as mim-unetr.",
    "mae": "MAE (masked autoencoder): hides 75% of a ViT's 16³ patches and reconstructs their voxels with a small "
           "decoder; fast. Fine-tunes as unetr.",
    "simmim": "SimMIM: replaces 75% of the patches with a learned mask token and predicts their voxels with one "
              "linear layer; the simplest and fast. Fine-tunes as unetr.",
}


# ---- settings -> command lines --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PretrainSettings:
    """A new `mim3d pretrain` run (defaults as `mim3d pretrain --help`)."""

    data_folders: tuple[str, ...]
    out: str  # the new run folder (must not hold a run)
    method: str = "mim"
    preset: str = "base"
    epochs: int = 800
    batch_size: int = 1
    base_lr: float = 1e-4  # --blr: lr = base lr × effective batch / 256
    amp: bool | None = None  # None: the worker's default (on for CUDA)
    device: str = "auto"
    workers: int = 2
    cache: str | None = None  # None: $MIM3D_HOME/cache
    init: str | None = None  # starting weights: an official MiM checkpoint or a mim3d one
    overrides: tuple[str, ...] = ()  # model config fields, "KEY=VALUE"
    max_steps: int | None = None
    log_every: int | None = None

    def to_args(self) -> list[str]:
        args = [arg for folder in self.data_folders for arg in ("--data", str(folder))]
        args += ["--out", str(self.out), "--method", self.method, "--preset", self.preset, *_overrides(self.overrides),
                 "--epochs", str(self.epochs), "--batch-size", str(self.batch_size), "--blr", repr(float(self.base_lr)),
                 "--device", self.device, "--workers", str(self.workers)]
        return args + _optional(amp=self.amp, cache=self.cache, init=self.init, max_steps=self.max_steps,
                                log_every=self.log_every)

    def check(self) -> list[str]:
        problems = [] if self.data_folders else ["Choose at least one folder of scans."]
        problems += [f"The scan folder {folder} does not exist." for folder in self.data_folders
                     if not Path(folder).is_dir()]
        problems += _choice("method", self.method, METHODS) + _choice("model size", self.preset, PRESETS)
        problems += _numbers(self) + _out_problems(self.out) + _cache_problems(self.cache)
        if self.init and not Path(self.init).is_file():
            problems.append(f"The starting weights {self.init} are not a file.")
        return problems


@dataclass(frozen=True)
class FinetuneSettings:
    """A new `mim3d finetune` run: one data source (images + labels folders with a label table, a dataset.json, or a
    folder of .seg.nrrd segmentations); defaults as `mim3d finetune --help`."""

    out: str
    images: str | None = None
    labels: str | None = None
    dataset: str | None = None
    segmentations: str | None = None
    label_table: str | None = None  # labels.json; required with images + labels
    label_map: str | None = None  # source label -> table value, JSON text or a .json file
    pretrained: str | None = None  # a `mim3d pretrain` run folder, a checkpoint file, or None (from scratch)
    arch: str = "mim-unetr"
    preset: str = "base"
    epochs: int = 500
    batch_size: int = 1
    lr: float = 1e-4
    amp: bool | None = None
    device: str = "auto"
    workers: int = 2
    cache: str | None = None
    roi: tuple[int, ...] | None = None  # None: 96³
    spacing: tuple[float, ...] | None = None  # None: 1.5 × 1.5 × 2 mm
    samples_per_volume: int | None = None  # None: 4
    val_every: int | None = None
    val_fraction: float | None = None  # None: 0.2
    overrides: tuple[str, ...] = ()
    max_steps: int | None = None
    log_every: int | None = None

    def to_args(self) -> list[str]:
        args = _optional(images=self.images, labels=self.labels, dataset=self.dataset,
                         segmentations=self.segmentations, label_table=self.label_table, label_map=self.label_map)
        args += ["--out", str(self.out), "--arch", self.arch, "--preset", self.preset, *_overrides(self.overrides),
                 "--epochs", str(self.epochs), "--batch-size", str(self.batch_size), "--lr", repr(float(self.lr)),
                 "--device", self.device, "--workers", str(self.workers)]
        args += _optional(pretrained=self.pretrained, amp=self.amp, cache=self.cache, roi=self.roi,
                          spacing=self.spacing, samples_per_volume=self.samples_per_volume, val_every=self.val_every,
                          val_fraction=self.val_fraction, max_steps=self.max_steps, log_every=self.log_every)
        return args

    def check(self) -> list[str]:
        problems = self._source_problems() + _choice("architecture", self.arch, ARCHS)
        problems += _choice("model size", self.preset, PRESETS) + _numbers(self) + _out_problems(self.out)
        problems += _cache_problems(self.cache) + self._pretrained_problems()
        if self.val_fraction is not None and not 0 <= self.val_fraction < 1:
            problems.append(f"The validation share must lie between 0 and 1 (it is {self.val_fraction:g}).")
        return problems

    def _source_problems(self) -> list[str]:
        chosen = [name for name, value in (("images and labels folders", self.images or self.labels),
                                           ("a dataset.json", self.dataset),
                                           ("a segmentations folder", self.segmentations)) if value]
        if len(chosen) != 1:
            return ["Choose one source of labelled cases: images and labels folders, a dataset.json, or a folder "
                    "of segmentations" + (f" (now: {' and '.join(chosen)})." if chosen else ".")]
        problems = []
        if self.images or self.labels:
            problems += [f"Choose the {what} folder." for what, value in (("images", self.images),
                                                                         ("labels", self.labels)) if not value]
            problems += [f"The {what} folder {value} does not exist." for what, value in
                         (("images", self.images), ("labels", self.labels)) if value and not Path(value).is_dir()]
            if not self.label_table:
                problems.append("Choose a label table (labels.json): label maps carry no names.")
        if self.dataset and not Path(self.dataset).is_file():
            problems.append(f"The dataset file {self.dataset} does not exist.")
        if self.segmentations and not Path(self.segmentations).is_dir():
            problems.append(f"The segmentations folder {self.segmentations} does not exist.")
        if self.label_table and not Path(self.label_table).is_file():
            problems.append(f"The label table {self.label_table} does not exist.")
        return problems

    def _pretrained_problems(self) -> list[str]:
        if not self.pretrained:
            return []
        path = Path(self.pretrained)
        if not path.exists():
            return [f"The pre-trained encoder {path} does not exist."]
        if path.is_file():
            return []
        config = read_json(RunDir(path).config)
        if config is None or config.get("command") != "pretrain":
            return [f"{path} is not a pre-training run folder; choose a pre-training run or a checkpoint file."]
        method = config.get("model", {}).get("method")
        if ENCODER_ARCH.get(method, self.arch) != self.arch:
            return [f"{path} is a {method} pre-training run; its encoder fine-tunes with the {ENCODER_ARCH[method]} "
                    f"architecture, not {self.arch}."]
        if not RunDir(path).checkpoint("last").exists():
            return [f"The pre-training run {path} has no checkpoint yet (it has not finished an epoch)."]
        return []


def resume_args(run_dir: str | os.PathLike) -> list[str]:
    """The options that continue `run_dir` from checkpoints/last.pt with its saved options (either command)."""
    return ["--resume", str(run_dir)]


def _overrides(items: tuple[str, ...]) -> list[str]:
    return [arg for item in items for arg in ("--override", item)]


def _optional(**values) -> list[str]:
    """--option value for each value that is set (True/False: --amp / --no-amp; a tuple: several values)."""
    args = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, tuple | list):
            args += [flag, *(repr(float(v)) if isinstance(v, float) else str(v) for v in value)]
        else:
            args += [flag, repr(float(value)) if isinstance(value, float) else str(value)]
    return args


def _choice(what: str, value: str, choices: tuple[str, ...]) -> list[str]:
    return [] if value in choices else [f"Unknown {what} '{value}'; choose {', '.join(choices)}."]


def _numbers(s: PretrainSettings | FinetuneSettings) -> list[str]:
    problems = [f"{what} must be at least 1 (it is {value})." for what, value in
                (("Epochs", s.epochs), ("Batch size", s.batch_size), ("Maximum steps", s.max_steps))
                if value is not None and value < 1]
    if s.workers < 0:
        problems.append(f"Data-loading workers must be 0 or more (it is {s.workers}).")
    rate = s.base_lr if isinstance(s, PretrainSettings) else s.lr
    if not (math.isfinite(rate) and rate >= 0):
        problems.append(f"The learning rate must be a number of 0 or more (it is {rate}).")
    return problems + _choice("device", s.device, DEVICES)


def _out_problems(out: str) -> list[str]:
    if not str(out).strip():
        return ["Choose a folder for the new run."]
    path = Path(out)
    if RunDir(path).holds_run():
        state = read_status(path)["state"]
        return [f"{path} already holds a run ({state}); resume it, or choose another folder for the new run."]
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        return [f"{path} exists and is not an empty folder; choose a new folder for the run."]
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK):
        return [f"Cannot create {path}: {parent} is not writable."]
    return []


def _cache_problems(cache: str | None) -> list[str]:
    if cache and Path(cache).exists() and not Path(cache).is_dir():
        return [f"The cache {cache} is a file, not a folder."]
    return []


# ---- the scan-folder preview ----------------------------------------------------------------------------------------

def preview_args(folders: list[str] | tuple[str, ...]) -> list[str]:
    """`mim3d pretrain` options that report what a run on `folders` would train on, without training."""
    return [*(arg for folder in folders for arg in ("--data", str(folder))), "--check-data"]


def summarize_preview(event: dict, max_skipped: int = 10) -> str:
    """The preview's result (or error) event as a few lines for the panel."""
    if event.get("type") == "error":
        return f"These folders cannot be used: {event.get('message', 'the worker gave no reason')}"
    summary = event["summary"]
    formats = ", ".join(f"{kind} {count}" for kind, count in summary["formats"].items())
    spacing = {k: "×".join(f"{x:.3g}" for x in v) for k, v in summary["spacing_mm"].items()}
    lines = [f"{summary['count']} volume{'s' * (summary['count'] != 1)} ({formats}), "
             f"{_megabytes(summary['total_bytes'])}",
             f"spacing {spacing['median']} mm (median; from {spacing['min']} to {spacing['max']})"]
    skipped = summary["skipped"]
    if skipped:
        lines.append(f"{len(skipped)} file{'s' * (len(skipped) != 1)} will be skipped:")
        lines += [f"  {item['path']}: {item['reason']}" for item in skipped[:max_skipped]]
        if len(skipped) > max_skipped:
            lines.append(f"  ... and {len(skipped) - max_skipped} more")
    else:
        lines.append("nothing will be skipped")
    return "\n".join(lines)


def _megabytes(count: int) -> str:
    return f"{count / 1e9:.1f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"


# ---- rough wall time ------------------------------------------------------------------------------------------------

# docs/BENCHMARKS.md, 2-core CPU, fp32, batch 1: seconds per pre-training sample (MiM small 128³ crops, base 192³;
# MAE/SimMIM small 64³, base 96³).
PRETRAIN_SAMPLE_S = {("mim", "small"): 2.84, ("mim", "base"): 61.4, ("mae", "small"): 0.059, ("mae", "base"): 0.77,
                     ("simmim", "small"): 0.067, ("simmim", "base"): 0.97}
# Seconds per fine-tuning step of 4 crops, small preset, at ROI 64³ and 96³ (same machine).
FINETUNE_STEP_S = {"mim-unetr": (8.5, 31.2), "unetr": (2.7, 7.8)}
# The base fine-tuning networks were not measured: their pre-training per-voxel cost over small (MiM 61.4 s / 2.84 s
# at 3.4× the voxels; MAE 0.77 s / 0.059 s at 3.4× the voxels).
FINETUNE_BASE_FACTOR = {"mim-unetr": 6.4, "unetr": 3.9}
MEASURED_CORES = 2
GPU_SPEEDUP = 20  # assumed, not measured: a modern GPU against the 2-core CPU above (conservative)


def estimate_time(settings: PretrainSettings | FinetuneSettings, num_volumes: int, device: str,
                  cpu_count: int | None = None) -> str:
    """A rough wall time for the training steps, e.g. "about 2 h on this CPU" or "roughly 25 min on the GPU (...)".

    num_volumes: the scans found (pre-training) or the labelled cases (fine-tuning; the validation share is held out
    as the worker does). device: what this machine has, "cpu" or "cuda" (a run set to "cpu" counts as the CPU).
    Validation passes and the first pass that fills the cache are not included.
    """
    steps, step_s = (_pretrain_steps(settings, num_volumes) if isinstance(settings, PretrainSettings)
                     else _finetune_steps(settings, num_volumes))
    if steps == 0:
        return "no estimate: fewer volumes than one training step needs"
    seconds = steps * step_s
    if device == "cuda" and settings.device != "cpu":
        return (f"roughly {format_duration(seconds / GPU_SPEEDUP)} on the GPU (a rough guess: the GPU is assumed "
                f"{GPU_SPEEDUP}× faster than a {MEASURED_CORES}-core CPU)")
    cores = cpu_count or os.cpu_count() or MEASURED_CORES
    speedup = min(4.0, max(1.0, cores / MEASURED_CORES) ** 0.5)  # torch's CPU kernels scale well below linearly
    return f"about {format_duration(seconds / speedup)} on this CPU"


def _pretrain_steps(s: PretrainSettings, num_volumes: int) -> tuple[int, float]:
    steps = s.epochs * (num_volumes // s.batch_size)
    steps = min(steps, s.max_steps or steps)
    return steps, PRETRAIN_SAMPLE_S[(s.method, s.preset)] * s.batch_size


def _finetune_steps(s: FinetuneSettings, num_cases: int) -> tuple[int, float]:
    share = 0.2 if s.val_fraction is None else s.val_fraction
    held_out = min(max(1, round(share * num_cases)), num_cases - 1) if num_cases >= 2 and share > 0 else 0
    steps = s.epochs * ((num_cases - held_out) // s.batch_size)
    steps = min(steps, s.max_steps or steps)
    roi = s.roi or (96,)
    voxels = math.prod(roi * 3 if len(roi) == 1 else roi)
    at64, at96 = FINETUNE_STEP_S[s.arch]
    exponent = math.log(at96 / at64) / math.log(1.5**3)  # measured growth with the crop's voxels
    step_s = at64 * (voxels / 64**3) ** exponent * ((s.samples_per_volume or 4) / 4) * s.batch_size
    return steps, step_s * (FINETUNE_BASE_FACTOR[s.arch] if s.preset == "base" else 1.0)


def format_duration(seconds: float) -> str:
    """45 s, 12 min, 1.5 h, 3 days."""
    if round(seconds) < 60:
        return f"{max(1, round(seconds))} s"
    if round(seconds / 60) < 60:
        return f"{round(seconds / 60)} min"
    if seconds < 48 * 3600:
        return f"{_one_decimal(seconds / 3600)} h"
    return f"{_one_decimal(seconds / 86400)} days"


def _one_decimal(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0") if value < 10 else f"{round(value)}"
