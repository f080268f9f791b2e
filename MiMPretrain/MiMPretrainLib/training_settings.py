"""What the training panel asks for, as `mim3d pretrain` / `mim3d finetune` command lines. Standard library only.

- `PretrainSettings` and `FinetuneSettings`: the panel's choices, as the command line's own option dataclasses
  (mim3d.run_options: the same fields, defaults and checks); `to_args()` gives the exact worker options and `check()`
  the problems a person must fix first, in plain words (an empty list: ready to start).
- `resume_args(run_dir)`: the options that continue a stopped or killed run.
- `preview_args(folders)` / `summarize_preview(event)`: the scan-folder preview, computed by the worker
  (`mim3d pretrain --data DIR --check-data`) and shown as a few lines.
- `plan_args(settings)` / `summarize_plan(result, error)`: the run's memory plan, computed by the worker on the device
  the run would use (`mim3d COMMAND ... --check-plan`) and shown as one line.
- `estimate_time(settings, num_volumes, device)`: a rough wall time from the step times in docs/BENCHMARKS.md.
- `default(options, name)`: an option's default, the panel's too (one default each; PANEL_DEFAULTS: where the panel
  must differ, and why). `installed_models()`: the installed packages a fine-tuning run can start from.
- `start_after_install(install, start)`: Start, once the worker's Python packages are there.
- `label_names(text)`: the label names typed into a text field, comma-separated (for --keep-largest).

A setting left alone is left out of the command line, so it means what `mim3d --help` says.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mim3d import registry
from mim3d.errors import BadInputError
from mim3d.package import is_package
from mim3d.presets import DEVICES
from mim3d.presets import PRESET_NAMES as PRESETS
from mim3d.presets import PRETRAINING_METHODS as METHODS
from mim3d.presets import SEGMENTATION_ARCHS as ARCHS
from mim3d.run_options import FinetuneOptions, PretrainOptions
from mim3d.runs import RunDir, pretrained_checkpoint, read_status

METHOD_NOTES = {  # one line each, for the panel's method chooser
    "mim": "MiM (Mask in Mask): masks each scan at three nested levels, restores every level and aligns them; "
           "the strongest encoder and the slowest to train. Fine-tunes as mim-unetr.",
    "mae": "MAE (masked autoencoder): hides 75% of a ViT's 16³ patches and reconstructs their voxels with a small "
           "decoder; fast. Fine-tunes as unetr.",
    "simmim": "SimMIM: replaces 75% of the patches with a learned mask token and predicts their voxels with one "
              "linear layer; the simplest and fast. Fine-tunes as unetr.",
}
# The panel's defaults that differ from the command line's, with the reason (every other one is `default`'s).
PANEL_DEFAULTS = {
    "amp": True,  # a checkbox has no "the device's default" state; on is that default on CUDA, and ignored on the CPU
}


def default(options: type, name: str) -> Any:
    """The default of option `name` of `options` (PretrainOptions / FinetuneOptions), as the panel shows it."""
    if name in PANEL_DEFAULTS:
        return PANEL_DEFAULTS[name]
    return next(f.default for f in dataclasses.fields(options) if f.name == name)


# How the panel names the numbers it checks (the checks are the options' own).
NUMBER_LABELS = {"epochs": "Epochs", "batch_size": "Batch size", "max_steps": "Maximum steps",
                 "workers": "Data-loading workers", "blr": "The learning rate", "lr": "The learning rate"}


# ---- settings -> command lines --------------------------------------------------------------------------------------

class PretrainSettings(PretrainOptions):
    """A new `mim3d pretrain` run: `PretrainOptions` (data, out, method, ...; `to_args()`) plus the panel's check."""

    def check(self) -> list[str]:
        folders = self.data or ()
        problems = [] if folders else ["Choose at least one folder of scans."]
        problems += [f"The scan folder {folder} does not exist." for folder in folders if not Path(folder).is_dir()]
        problems += _choice("method", self.method, METHODS) + _choice("model size", self.preset, PRESETS)
        problems += _numbers(self) + _out_problems(self.out) + _cache_problems(self.cache)
        if self.init and not Path(self.init).is_file():
            problems.append(f"The starting weights {self.init} are not a file.")
        return problems


class FinetuneSettings(FinetuneOptions):
    """A new `mim3d finetune` run: `FinetuneOptions` (one data source: images + labels folders with a label table, a
    dataset.json, or a folder of .seg.nrrd segmentations; `to_args()`) plus the panel's check."""

    def check(self) -> list[str]:
        problems = self._source_problems() + _choice("architecture", self.arch, ARCHS)
        problems += _choice("model size", self.preset, PRESETS) + _numbers(self) + _out_problems(self.out)
        problems += _cache_problems(self.cache) + self._pretrained_problems()
        if not 0 <= self.val_fraction < 1:
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
        """A checkpoint file, a model package, or a run folder that offers a checkpoint (the CLI's rule:
        mim3d.runs.pretrained_checkpoint); frozen and gradual need one."""
        if not self.pretrained:
            return [] if self.encoder == "full" else [f"The encoder setting '{self.encoder}' needs a pre-trained "
                                                      "encoder or model to start from."]
        path = Path(self.pretrained)
        if not path.exists():
            return [f"The pre-trained encoder {path} does not exist."]
        if is_package(path):
            return []
        try:
            if path.is_dir():
                pretrained_checkpoint(path, self.arch)
        except BadInputError as e:
            return [f"{e}."]
        return []


def installed_models(home: Path | None = None) -> list[tuple[str, str]]:
    """(name shown, package folder) of each readable installed model (mim3d.registry), to start fine-tuning from."""
    return [(f"{m.id} ({', '.join(label.name for label in m.info.labels)})", str(m.path))
            for m in registry.list_installed(home) if m.info is not None]


def label_names(text: str) -> tuple[str, ...] | None:
    """"liver, right kidney" -> ("liver", "right kidney"); None for a field left empty (names may hold spaces, so
    commas separate them)."""
    return tuple(name.strip() for name in text.split(",") if name.strip()) or None


def start_after_install(install: Callable[[], bool], start: Callable[[], Any]) -> Any:
    """`start()` once `install()` says the worker's Python packages are there (it offers to install what is missing,
    as MiM Segmentation does: True when everything is there). False, the person declined: a quiet cancel, None."""
    return start() if install() else None


def resume_args(run_dir: str | os.PathLike) -> list[str]:
    """The options that continue `run_dir` from checkpoints/last.pt with its saved options (either command)."""
    return ["--resume", str(run_dir)]


def _choice(what: str, value: str, choices: tuple[str, ...]) -> list[str]:
    return [] if value in choices else [f"Unknown {what} '{value}'; choose {', '.join(choices)}."]


def _numbers(s: PretrainSettings | FinetuneSettings) -> list[str]:
    problems = [f"{NUMBER_LABELS[name]} {problem} (it is {value})." for name, value, problem in s.problems()
                if name in NUMBER_LABELS]
    return problems + _choice("device", s.device, DEVICES)


def _out_problems(out: str | None) -> list[str]:
    if not str(out or "").strip():
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


# ---- the memory plan ------------------------------------------------------------------------------------------------

def plan_args(settings: PretrainSettings | FinetuneSettings) -> list[str] | None:
    """`mim3d COMMAND` options that plan the run's memory on the device it would use, without training
    (`--check-plan`); None while the settings have problems (the worker would only repeat them)."""
    return None if settings.check() else [*settings.to_args(), "--check-plan"]


def summarize_plan(result: dict | None, error: dict | None, message: str = "") -> str:
    """The memory line under the time estimate, from `--check-plan`'s result event and, when it exited non-zero,
    its error event (or the job's `message` when the worker gave neither)."""
    if result is None:
        reason = (error or {}).get("message") or message or "the worker gave no reason"
        return f"Memory: no estimate ({reason})"
    need = _gigabytes(result["estimate_bytes"])
    room = f"{_gigabytes(result['budget_bytes'])} ({result['budget_source']})"
    if not result["fits"]:
        return f"Memory ({result['device']}): will not fit, needs about {need} of {room}: {result['would_fit']}"
    how = ("fits with activation checkpointing (about a third more time per step)"
           if result["choices"]["activation_checkpointing"] else "fits")
    return f"Memory ({result['device']}): about {need} of {room}: {how}"


def _gigabytes(count: int) -> str:
    return f"{count / 1e9:.1f} GB"


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
# A step's time with the encoder frozen, or gradual's mean over its schedule, as a share of full's: the demo's CPU
# mim-unetr (64×64×32, 4 crops), 2.63 s against 2.99 s a step (docs/BENCHMARKS.md, bench_finetune_modes.py; the
# decoder's full-resolution convolutions dominate). gradual: frozen for its first quarter, then counted as full.
ENCODER_STEP_FACTOR = {"full": 1.0, "frozen": 0.88}
ENCODER_STEP_FACTOR["gradual"] = 0.25 * ENCODER_STEP_FACTOR["frozen"] + 0.75
MEASURED_CORES = 2
# No GPU step time has been measured yet (docs/BENCHMARKS.md): a GPU run gets no figure rather than a guessed one.
NO_GPU_ESTIMATE = "no GPU estimate yet (no GPU step times measured, docs/BENCHMARKS.md)"


def estimate_time(settings: PretrainSettings | FinetuneSettings, num_volumes: int, device: str,
                  cpu_count: int | None = None) -> str:
    """A rough wall time for the training steps, e.g. "about 2 h on this CPU"; NO_GPU_ESTIMATE for a GPU run.

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
        return NO_GPU_ESTIMATE
    cores = cpu_count or os.cpu_count() or MEASURED_CORES
    speedup = min(4.0, max(1.0, cores / MEASURED_CORES) ** 0.5)  # torch's CPU kernels scale well below linearly
    return f"about {format_duration(seconds / speedup)} on this CPU"


def _pretrain_steps(s: PretrainSettings, num_volumes: int) -> tuple[int, float]:
    steps = s.epochs * (num_volumes // s.batch_size)
    steps = min(steps, s.max_steps or steps)
    return steps, PRETRAIN_SAMPLE_S[(s.method, s.preset)] * s.batch_size


def _finetune_steps(s: FinetuneSettings, num_cases: int) -> tuple[int, float]:
    share = s.val_fraction
    held_out = min(max(1, round(share * num_cases)), num_cases - 1) if num_cases >= 2 and share > 0 else 0
    steps = s.epochs * ((num_cases - held_out) // s.batch_size)
    steps = min(steps, s.max_steps or steps)
    roi = s.roi
    voxels = math.prod(roi * 3 if len(roi) == 1 else roi)
    at64, at96 = FINETUNE_STEP_S[s.arch]
    exponent = math.log(at96 / at64) / math.log(1.5**3)  # measured growth with the crop's voxels
    step_s = at64 * (voxels / 64**3) ** exponent * (s.samples_per_volume / 4) * s.batch_size
    step_s *= ENCODER_STEP_FACTOR[s.encoder]
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
