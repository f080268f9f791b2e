"""The command-line options of `mim3d finetune`, their defaults (MIM_METHOD §9.5), and the checks on them.

Options are resolved into one plain dict (config.json "options"), which `--resume` reads back: an option given again
on resume must agree with the saved one, except those in RESUME_MAY_CHANGE. Helpers shared with `mim3d pretrain`
(overrides, cache folder, the new-run-folder check) come from `options`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..errors import BadInputError
from ..models import SEGMENTATION_ARCHS
from ..runs import RunDir
from .options import absolute_paths, default_cache_dir, parse_overrides, resume_options

DEFAULTS = {
    "images": None, "labels": None, "dataset": None, "segmentations": None,  # exactly one source (images + labels)
    "label_table": None, "label_map": None, "val_fraction": 0.2, "val_cases": None, "out": None,
    "arch": "mim-unetr", "pretrained": None, "preset": "base", "override": {},
    "epochs": 500,  # §9.5: "a few hundred to a few thousand epochs" (the official value is not released)
    "roi": [96, 96, 96], "spacing": [1.5, 1.5, 2.0], "intensity": [-175.0, 250.0],  # §9.5
    "samples_per_volume": 4, "batch_size": 1, "accum": 1,  # §9.5: batch 1 volume × 4 crops
    "lr": 1e-4, "min_lr": 0.0, "warmup_epochs": None,  # §9.5: lr assumed (Swin-UNETR), warm-up + cosine to 0
    "weight_decay": 1e-5, "clip_grad": 5.0,  # §9.5: AdamW reg_weight 1e-5, gradient-norm clip 5
    "val_every": 10, "device": "auto", "amp": None, "workers": 2, "cache": None, "seed": 0,
    "max_steps": None, "checkpoint_every": 100, "log_every": 10,
}
# Options that only change how the run is executed or observed, not the training it computes.
RESUME_MAY_CHANGE = {"device", "amp", "workers", "cache", "max_steps", "checkpoint_every", "log_every", "val_every"}
WARMUP_FRACTION = 0.1  # default warm-up: a tenth of the epochs, the official 50 of the default 500 (§9.5)
SOURCE_OPTIONS = ("images", "dataset", "segmentations")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    data = parser.add_argument_group("data (exactly one of --images/--labels, --dataset, --segmentations)")
    data.add_argument("--images", metavar="DIR", help="folder of images; each pairs with the label of the same name")
    data.add_argument("--labels", metavar="DIR", help="folder of label maps (with --images)")
    data.add_argument("--dataset", metavar="JSON", help="MSD / nnU-Net dataset.json (its labels are the label table)")
    data.add_argument("--segmentations", metavar="DIR", help=".seg.nrrd files beside their images (segment names "
                      "are the label table)")
    data.add_argument("--label-table", metavar="JSON", help="labels.json: value, name, colour (required with "
                      "--images; replaces the table of --dataset / --segmentations)")
    data.add_argument("--label-map", metavar="JSON", help="source label -> table value, as JSON text or a .json "
                      "file, e.g. '{\"5\": 1, \"1\": 2}'; unmapped labels become background")
    data.add_argument("--val-fraction", type=float, help="share of the cases held out for validation (default 0.2, "
                      "at least one; 0, or a single case: validate on the training cases)")
    data.add_argument("--val-cases", nargs="+", metavar="NAME", help="validate on these cases (instead of "
                      "--val-fraction)")
    add("--out", metavar="RUN_DIR", help="new run folder (must not hold a run)")
    add("--resume", metavar="RUN_DIR", help="continue this run from checkpoints/last.pt with its saved options")
    add("--arch", choices=SEGMENTATION_ARCHS, help="mim-unetr (for MiM encoders) or unetr (MAE / SimMIM); "
        "default mim-unetr")
    add("--pretrained", metavar="CHECKPOINT|RUN_DIR", help="encoder weights: an official MiM checkpoint, a mim3d "
        "checkpoint, or a `mim3d pretrain` run folder (its final weights, checkpoints/last.pt); default: from scratch")
    add("--preset", choices=("small", "base"), help="model size, as the encoder was pre-trained (default base)")
    add("--override", action="append", metavar="KEY=VALUE", help="model config field, value as JSON when it parses "
        "(e.g. depths=[1,1,1,4]); repeatable")
    add("--epochs", type=int, help="epochs (passes over the training cases) of the schedule (default 500)")
    add("--roi", type=int, nargs="+", metavar="N", help="crop and sliding-window size in voxels, 1 or 3 values, "
        "multiples of 16 (mim-unetr: 32) (default 96)")
    add("--spacing", type=float, nargs="+", metavar="MM", help="target voxel spacing, 1 or 3 values (default 1.5 1.5 "
        "2.0)")
    add("--intensity", type=float, nargs=2, metavar=("LOW", "HIGH"), help="HU window mapped to [0, 1] (default "
        "-175 250)")
    add("--samples-per-volume", type=int, help="random crops per case and step (default 4)")
    add("--batch-size", type=int, help="cases per micro-batch and process (default 1)")
    add("--accum", type=int, help="micro-batches accumulated per optimiser step (default 1)")
    add("--lr", type=float, help="peak learning rate (default 1e-4)")
    add("--min-lr", type=float, help="end of the cosine schedule (default 0)")
    add("--warmup-epochs", type=float, help="linear warm-up, in epochs (default a tenth of --epochs)")
    add("--weight-decay", type=float, help="AdamW weight decay on weights, not biases/norms (default 1e-5)")
    add("--clip-grad", type=float, help="clip the gradient norm to this (default 5; 0 = no clipping)")
    add("--val-every", type=int, metavar="EPOCHS", help="validate every N epochs, and at the end (default 10)")
    add("--device", choices=("auto", "cpu", "cuda"), help="default auto: CUDA when available")
    add("--amp", action=argparse.BooleanOptionalAction,
        help="mixed precision (default on for CUDA: bf16, or fp16 + GradScaler; ignored on the CPU: slower there)")
    add("--workers", type=int, help="data-loading processes (default 2; 0 loads in the training process)")
    add("--cache", metavar="DIR", help="pre-processed case cache (default $MIM3D_HOME/cache, else "
        "~/.cache/mim3d/cache)")
    add("--seed", type=int, help="seed of the initial weights, split, crops and augmentations (default 0)")
    add("--max-steps", type=int, help="end after this many optimiser steps (the schedule still spans --epochs)")
    add("--checkpoint-every", type=int, metavar="EPOCHS", help="keep checkpoints/epoch-N.pt every N epochs "
        "(default 100; last.pt is written every epoch, best.pt at every better validation)")
    add("--log-every", type=int, metavar="STEPS", help="metrics.jsonl / TensorBoard every N steps (default 10)")


def resolve(args: argparse.Namespace) -> tuple[dict, RunDir | None]:
    """The resolved options and, for --resume, the run folder. Raises BadInputError on a bad or conflicting option."""
    given = {k: v for k, v in vars(args).items() if v is not None and k != "resume"}
    if "override" in given:
        given["override"] = parse_overrides(given["override"])
    if "label_map" in given:
        given["label_map"] = parse_label_map(given["label_map"])
    for key in ("roi", "spacing"):
        if key in given:
            given[key] = _three(key, given[key])
    for key in ("images", "labels", "dataset", "segmentations", "label_table", "out", "pretrained", "cache"):
        if key in given:
            given[key] = absolute_paths(given[key])
    if args.resume:
        resume = RunDir(absolute_paths(args.resume))
        opts = resume_options(resume, given, command="finetune", may_change=RESUME_MAY_CHANGE)
        _check_numbers(opts)
        return opts, resume
    _check_sources(given)
    if "out" not in given:
        raise BadInputError("--out required for a new run (or --resume RUN_DIR to continue one)")
    opts = {**DEFAULTS, **given}
    opts["cache"] = opts["cache"] or str(default_cache_dir())
    if opts["warmup_epochs"] is None:
        opts["warmup_epochs"] = WARMUP_FRACTION * opts["epochs"]
    _check_numbers(opts)
    return opts, None


def parse_label_map(text: str) -> dict[str, int]:
    """'{"5": 1, "1": 2}' or a path to a .json file holding such an object -> {"5": 1, "1": 2}.

    Keys stay text here: voxel values for label files, segment names for .seg.nrrd files (finetune_data).
    """
    source = "--label-map"
    if not text.lstrip().startswith("{"):
        path = Path(text).expanduser()
        try:
            text, source = path.read_text(encoding="utf-8"), f"--label-map {path}"
        except (OSError, UnicodeDecodeError) as e:
            raise BadInputError(f"--label-map {text}: neither JSON text nor a readable file ({e})") from e
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInputError(f"{source}: not valid JSON ({e}); expected an object like {{\"5\": 1, \"1\": 2}}") from e
    if not isinstance(mapping, dict) or not mapping:
        raise BadInputError(f"{source}: expected a non-empty object like {{\"5\": 1, \"1\": 2}} (source label -> "
                            "table value)")
    bad = [f"{k}: {v!r}" for k, v in mapping.items() if not isinstance(v, int) or isinstance(v, bool) or
           not 0 <= v <= 255]
    if bad:
        raise BadInputError(f"{source}: table values must be integers 0..255, got {', '.join(bad)}")
    return {str(k): v for k, v in mapping.items()}


def _three(key: str, values: list) -> list:
    if len(values) not in (1, 3):
        raise BadInputError(f"--{key}: {' '.join(map(str, values))}; give one value (the same on every axis) or three")
    values = values * 3 if len(values) == 1 else values
    if min(values) <= 0:
        raise BadInputError(f"--{key}: {' '.join(map(str, values))}; values must be positive")
    return values


def _check_sources(given: dict) -> None:
    chosen = [k for k in SOURCE_OPTIONS if k in given]
    if "labels" in given and "images" not in given:
        raise BadInputError("--labels needs --images (the folder of the images the labels belong to)")
    if len(chosen) != 1:
        raise BadInputError("give exactly one data source: --images DIR --labels DIR, --dataset dataset.json or "
                            "--segmentations DIR" + (f" (got {', '.join('--' + k for k in chosen)})" if chosen else ""))
    if chosen == ["images"] and "labels" not in given:
        raise BadInputError("--images needs --labels (the folder of label maps with the same names)")
    if chosen == ["images"] and "label_table" not in given:
        raise BadInputError("--images/--labels: give --label-table labels.json naming each label value (e.g. "
                            '{"labels": [{"value": 1, "name": "liver"}]}); label maps carry no names')
    if "val_cases" in given and "val_fraction" in given:
        raise BadInputError("give --val-cases or --val-fraction, not both")


def _check_numbers(opts: dict) -> None:
    for key in ("epochs", "batch_size", "accum", "samples_per_volume", "val_every", "checkpoint_every", "log_every"):
        if opts[key] < 1:
            raise BadInputError(f"--{key.replace('_', '-')}: {opts[key]}; must be at least 1")
    if opts["workers"] < 0:
        raise BadInputError(f"--workers: {opts['workers']}; must be 0 or more")
    if opts["max_steps"] is not None and opts["max_steps"] < 1:
        raise BadInputError(f"--max-steps: {opts['max_steps']}; must be at least 1")
    for key in ("lr", "min_lr", "weight_decay", "clip_grad"):
        if not (math.isfinite(opts[key]) and opts[key] >= 0):
            raise BadInputError(f"--{key.replace('_', '-')}: {opts[key]}; must be a finite number >= 0")
    if not 0 <= opts["val_fraction"] < 1:
        raise BadInputError(f"--val-fraction: {opts['val_fraction']}; must lie in [0, 1)")
    if not 0 <= opts["warmup_epochs"] <= opts["epochs"]:
        raise BadInputError(f"--warmup-epochs: {opts['warmup_epochs']}; must lie between 0 and --epochs "
                            f"{opts['epochs']}")
    if opts["roi"][0] != opts["roi"][1]:
        raise BadInputError(f"--roi: {' '.join(map(str, opts['roi']))}; the first two edges must be equal, because "
                            "the random 90° rotations (§9.5) turn crops in that plane")
    low, high = opts["intensity"]
    if not low < high:
        raise BadInputError(f"--intensity: {low:g} {high:g}; LOW must be below HIGH (HU)")


def optimisation_plan(opts: dict, sharding) -> dict:
    """Effective batch, learning rate and step counts (config.json "optimization").

    The learning rate is --lr as given (the BTCV recipe's batch scaling factor is 1 at its batch, §9.5).

    Raises:
        BadInputError: fewer training cases than one optimiser step needs.
    """
    spe, batch = sharding.steps_per_epoch, sharding.global_batch
    if spe < 1:
        raise BadInputError(f"{sharding.num_items} training cases, but one optimiser step takes batch "
                            f"{opts['batch_size']} × accum {opts['accum']} × {sharding.world.size} process(es) = "
                            f"{batch} cases; lower --batch-size or --accum, or add cases")
    crops = batch * opts["samples_per_volume"]
    scheduled = opts["epochs"] * spe
    return {"effective_batch": batch, "crops_per_step": crops, "batch_size": opts["batch_size"],
            "accum": opts["accum"], "world_size": sharding.world.size, "lr": opts["lr"],
            "lr_note": (f"lr {opts['lr']:.4g} (--lr as given); effective batch {batch} case(s) × "
                        f"{opts['samples_per_volume']} crops = {crops} crops per step (batch {opts['batch_size']} × "
                        f"accum {opts['accum']} × {sharding.world.size} process(es))"),
            "min_lr": opts["min_lr"], "weight_decay": opts["weight_decay"], "betas": [0.9, 0.999],
            "clip_grad": opts["clip_grad"], "epochs": opts["epochs"], "warmup_epochs": opts["warmup_epochs"],
            "warmup_steps": opts["warmup_epochs"] * spe, "steps_per_epoch": spe, "scheduled_steps": scheduled,
            "total_steps": min(scheduled, opts["max_steps"] or scheduled),
            "cases_unused_per_epoch": sharding.num_items - spe * batch}
