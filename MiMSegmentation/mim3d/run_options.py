"""The options of `mim3d pretrain` and `mim3d finetune`: one frozen dataclass per command, each field with its default,
its help and its check. Standard library only, so the Slicer panel builds the same objects the command line parses.

    parser = argparse.ArgumentParser(); add_arguments(parser, PretrainOptions)    # the parser, from the fields
    opts, resume = resolve(PretrainOptions, parser.parse_args(argv))               # checked; opts.epochs, ...
    PretrainOptions(data=("/scans",), out="runs/mim-1", epochs=100).to_args()      # the command line for them

config.json "options" is `opts.to_dict()` (the field names are its keys), and `--resume` rebuilds the options from it:
an option given again on resume must agree with the saved one, except the fields marked `may_change` (how the run is
executed or observed, not what it computes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .errors import BadInputError
from .presets import CROP_CENTRES, DEVICES, ENCODER_MODES, PRESET_NAMES, PRETRAINING_METHODS, SEGMENTATION_ARCHS
from .runs import ACTIVE_STATES, RunDir, read_json, read_status

Check = Callable[[Any], str | None]  # a value -> what is wrong with it, or None


def option(default: Any, help: str, *, check: Check | None = None, parse: Callable | None = None, path: bool = False,
           may_change: bool = False, group: str | None = None, **arg: Any) -> Any:
    """A dataclass field that is also a command-line option.

    Args:
        help: the option's help; the parser appends "(default X)" when the default is not None.
        check: what is wrong with a value (None: nothing); None values are not checked (they mean "not set").
        parse: turns a value as the command line or config.json give it (a list, KEY=VALUE items, JSON text) into
            the field's value; applied on construction, so it must accept its own result too.
        path: the value is a path (or paths), made absolute when parsed.
        may_change: `--resume` accepts a value different from the run's.
        group: the argparse group listing the option.
        arg: passed to `add_argument` (type, nargs, metavar, choices, action).
    """
    kind = {"default_factory": dict} if default == {} else {"default": default}
    return field(**kind, metadata={"help": help, "check": check, "parse": parse, "path": path,
                                   "may_change": may_change, "group": group, "arg": arg})


def at_least(low: int) -> Check:
    return lambda v: None if v >= low else ("must be 0 or more" if low == 0 else f"must be at least {low}")


def finite_non_negative(value: float) -> str | None:
    return None if math.isfinite(value) and value >= 0 else "must be a finite number >= 0"


def one_of(choices: tuple[str, ...]) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def positive_values(values: tuple) -> str | None:
    if len(values) not in (1, 3):
        return "give one value (the same on every axis) or three"
    return None if all(math.isfinite(v) and v > 0 for v in values) else "values must be positive"


@dataclass(frozen=True)
class RunOptions:
    """What both training commands share: the run folder, model size, schedule, device, data loading and logging.

    Each command adds its data, its model choice and the fields whose defaults differ (epochs, batch_size, lr,
    warmup_epochs, weight_decay; METHOD.md §8.3 for pre-training, §9.5 for fine-tuning).
    """

    out: str | None = option(None, "new run folder (must not hold a run)", metavar="RUN_DIR", path=True)
    preset: str = option("base", "model size: base = the papers, small = CPU-sized (fine-tuning: as the encoder was "
                         "pre-trained)", check=one_of(PRESET_NAMES), choices=PRESET_NAMES)
    override: dict = option({}, "model config field, value as JSON when it parses (e.g. depths=[1,1,1,1]); repeatable",
                            parse=lambda v: v if isinstance(v, dict) else parse_overrides(v), action="append",
                            metavar="KEY=VALUE")
    accum: int = option(1, "micro-batches accumulated per optimiser step", check=at_least(1), type=int)
    min_lr: float = option(0.0, "end of the cosine schedule", check=finite_non_negative, type=float)
    device: str = option("auto", "auto: CUDA when available", check=one_of(DEVICES), choices=DEVICES, may_change=True)
    amp: bool | None = option(None, "mixed precision (default on for CUDA: bf16, or fp16 + GradScaler; ignored on the "
                              "CPU: slower there)", action=argparse.BooleanOptionalAction, may_change=True)
    workers: int = option(2, "data-loading processes (0 loads in the training process)", check=at_least(0), type=int,
                          may_change=True)
    cache: str | None = option(None, "pre-processed data cache (default $MIM3D_HOME/cache, else ~/.cache/mim3d/cache)",
                               metavar="DIR", path=True, may_change=True)
    seed: int = option(0, "seed of the initial weights, data order, crops, masks and augmentations", type=int)
    max_steps: int | None = option(None, "end after this many optimiser steps in all (the schedule still spans "
                                   "--epochs; kept by --resume unless given again)", check=at_least(1), type=int,
                                   may_change=True)
    checkpoint_every: int = option(100, "keep checkpoints/epoch-N.pt every N epochs (last.pt is written every epoch)",
                                   check=at_least(1), type=int, metavar="EPOCHS", may_change=True)  # METHOD.md §8.4
    log_every: int = option(10, "metrics.jsonl / TensorBoard every N steps", check=at_least(1), type=int,
                            metavar="STEPS", may_change=True)

    COMMAND: ClassVar[str]
    WARMUP_FRACTION: ClassVar[float]  # the default warm-up, as a share of --epochs

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, parse = getattr(self, f.name), f.metadata["parse"]
            if parse and value is not None:
                object.__setattr__(self, f.name, parse(value))  # frozen: set once, here

    def problems(self) -> list[tuple[str, Any, str]]:
        """(field, value, what is wrong) for each set field whose check fails, in field order."""
        found = []
        for f in dataclasses.fields(self):
            value, check = getattr(self, f.name), f.metadata.get("check")
            problem = check(value) if check and value is not None else None
            if problem:
                found.append((f.name, value, problem))
        return found

    def validate(self) -> None:
        """Raises BadInputError naming the first option that is out of range."""
        problems = self.problems()
        if problems:
            name, value, problem = problems[0]
            raise BadInputError(f"{flag(name)}: {show(value)}; {problem}")
        if self.warmup_epochs is not None and not 0 <= self.warmup_epochs <= self.epochs:
            raise BadInputError(f"--warmup-epochs: {self.warmup_epochs}; must lie between 0 and --epochs "
                                f"{self.epochs}")

    def completed(self) -> RunOptions:
        """With the defaults that depend on the machine or on other options filled in (cache folder, warm-up)."""
        warmup = self.WARMUP_FRACTION * self.epochs if self.warmup_epochs is None else self.warmup_epochs
        return dataclasses.replace(self, cache=self.cache or str(default_cache_dir()), warmup_epochs=warmup)

    def to_dict(self) -> dict:
        """config.json "options": every field, tuples as lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> RunOptions:
        """The options config.json "options" holds."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_args(self) -> list[str]:
        """The command line that `resolve` turns back into these options (options at their default are left out)."""
        args = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or value == default_of(f):
                continue
            if isinstance(value, bool):
                args.append(flag(f.name) if value else f"--no-{flag(f.name)[2:]}")
            elif f.metadata["arg"].get("action") == "append":
                items = value.items() if isinstance(value, dict) else value
                args += [a for item in items for a in (flag(f.name), _item(item))]
            elif isinstance(value, tuple):
                args += [flag(f.name), *map(str, value)]
            else:
                args += [flag(f.name), json.dumps(value) if isinstance(value, dict) else str(value)]
        return args


@dataclass(frozen=True)
class PretrainOptions(RunOptions):
    """`mim3d pretrain`: MiM, MAE or SimMIM on folders of scans (METHOD.md §8.3 for the recipe)."""

    data: tuple[str, ...] | None = option(None, "folder of scans, searched recursively (repeatable)",
                                          action="append", metavar="DIR", path=True, parse=tuple)
    method: str = option("mim", "pre-training method", check=one_of(PRETRAINING_METHODS),
                         choices=PRETRAINING_METHODS)
    init: str | None = option(None, "start from these weights: official MiM checkpoint or a mim3d one",
                              metavar="CHECKPOINT", path=True)
    epochs: int = option(800, "epochs of the schedule", check=at_least(1), type=int)  # §8.3
    batch_size: int = option(1, "volumes per micro-batch and process (--resume: may change if batch × processes "
                             "stays)", check=at_least(1), type=int, may_change=True)
    blr: float = option(1e-4, "base learning rate: lr = blr × effective batch / 256", check=finite_non_negative,
                        type=float)  # §8.3
    lr: float | None = option(None, "absolute learning rate, instead of the --blr rule", check=finite_non_negative,
                              type=float)
    warmup_epochs: float | None = option(None, "linear warm-up, in epochs (default 5%% of --epochs: 40 of 800)",
                                         type=float)  # §8.3
    weight_decay: float = option(0.05, "AdamW weight decay on weights, not biases/norms", check=finite_non_negative,
                                 type=float)  # §8.3

    COMMAND = "pretrain"
    WARMUP_FRACTION = 0.05  # the official 40 of 800 epochs (§8.3)

    def check_new_run(self) -> None:
        missing = [flag(k) for k in ("data", "out") if getattr(self, k) is None]
        if missing:
            raise BadInputError(f"{' and '.join(missing)} required for a new run (or --resume RUN_DIR to continue "
                                "one)")


DATA = "data (exactly one of --images/--labels, --dataset, --segmentations)"
SOURCE_OPTIONS = ("images", "dataset", "segmentations")


@dataclass(frozen=True)
class FinetuneOptions(RunOptions):
    """`mim3d finetune`: a segmenter on labelled cases (the BTCV recipe of METHOD.md §9.5)."""

    images: str | None = option(None, "folder of images; each pairs with the label of the same name", metavar="DIR",
                                path=True, group=DATA)
    labels: str | None = option(None, "folder of label maps (with --images)", metavar="DIR", path=True, group=DATA)
    dataset: str | None = option(None, "MSD / nnU-Net dataset.json (its labels are the label table)", metavar="JSON",
                                 path=True, group=DATA)
    segmentations: str | None = option(None, ".seg.nrrd files beside their images (segment names are the label "
                                       "table)", metavar="DIR", path=True, group=DATA)
    label_table: str | None = option(None, "labels.json: value, name, colour (required with --images; replaces the "
                                     "table of --dataset / --segmentations)", metavar="JSON", path=True, group=DATA)
    label_map: dict | None = option(None, "source label -> table value, as JSON text or a .json file, e.g. "
                                    "'{\"5\": 1, \"1\": 2}'; unmapped labels become background", metavar="JSON",
                                    parse=lambda v: v if isinstance(v, dict) else parse_label_map(v), group=DATA)
    val_fraction: float = option(0.2, "share of the cases held out for validation (at least one; 0, or a single "
                                 "case: validate on the training cases)", type=float, group=DATA,
                                 check=lambda v: None if 0 <= v < 1 else "must lie in [0, 1)")
    val_cases: tuple[str, ...] | None = option(None, "validate on these cases (instead of --val-fraction)",
                                               nargs="+", metavar="NAME", parse=tuple, group=DATA)
    arch: str = option("mim-unetr", "mim-unetr (for MiM encoders) or unetr (MAE / SimMIM)",
                       check=one_of(SEGMENTATION_ARCHS), choices=SEGMENTATION_ARCHS)
    pretrained: str | None = option(None, "start weights: an official MiM checkpoint, a mim3d checkpoint, a finished "
                                    "or stopped `mim3d pretrain` run folder (its checkpoints/last.pt: the encoder), "
                                    "or a mim3d model package, folder or .zip (encoder and decoder; output rows of "
                                    "labels with the same name kept); default: from scratch",
                                    metavar="CHECKPOINT|RUN_DIR|PACKAGE", path=True)
    encoder: str = option("full", "what trains of the pre-trained encoder: " + "; ".join(
                          f"{k}: {v}" for k, v in ENCODER_MODES.items()), check=one_of(tuple(ENCODER_MODES)),
                          choices=tuple(ENCODER_MODES))
    epochs: int = option(500, "epochs (passes over the training cases) of the schedule", check=at_least(1),
                         type=int)  # §9.5: "a few hundred to a few thousand epochs" (the official value is unknown)
    roi: tuple[int, ...] = option((96, 96, 96), "crop and sliding-window size in voxels, 1 or 3 values, multiples "
                                  "of 16 (mim-unetr: 32)", check=positive_values, parse=lambda v: _three("roi", v),
                                  type=int, nargs="+", metavar="N")  # §9.5
    spacing: tuple[float, ...] = option((1.5, 1.5, 2.0), "target voxel spacing, 1 or 3 values", type=float,
                                        check=positive_values, parse=lambda v: _three("spacing", v), nargs="+",
                                        metavar="MM")  # §9.5
    intensity: tuple[float, float] = option((-175.0, 250.0), "HU window mapped to [0, 1]", type=float, nargs=2,
                                            metavar=("LOW", "HIGH"), parse=tuple)  # §9.5
    samples_per_volume: int = option(4, "random crops per case and step", check=at_least(1), type=int)  # §9.5
    crops: str = option("pos-neg", "where crops are centred: pos-neg, half on labelled voxels and half elsewhere "
                        "(the recipe); classes, on each label and the background equally often, so that a small "
                        "organ is seen as often as a large one (few cases)", check=one_of(CROP_CENTRES),
                        choices=CROP_CENTRES)
    keep_largest: tuple[str, ...] | None = option(None, "labels of which `mim3d segment` keeps only the largest "
                                                  "connected component by default (an organ that is one piece); "
                                                  "written into the model package", nargs="+", metavar="LABEL",
                                                  parse=tuple)
    batch_size: int = option(1, "cases per micro-batch and process", check=at_least(1), type=int)  # §9.5
    lr: float = option(1e-4, "peak learning rate", check=finite_non_negative, type=float)  # §9.5 (Swin-UNETR)
    warmup_epochs: float | None = option(None, "linear warm-up, in epochs (default a tenth of --epochs)",
                                         type=float)
    weight_decay: float = option(1e-5, "AdamW weight decay on weights, not biases/norms", check=finite_non_negative,
                                 type=float)  # §9.5: reg_weight 1e-5
    clip_grad: float = option(5.0, "clip the gradient norm to this (0 = no clipping)", check=finite_non_negative,
                              type=float)  # §9.5
    val_every: int = option(10, "validate every N epochs, and at the end", check=at_least(1), type=int,
                            metavar="EPOCHS", may_change=True)

    COMMAND = "finetune"
    WARMUP_FRACTION = 0.1  # the official 50 of the default 500 epochs (§9.5)

    def validate(self) -> None:
        super().validate()
        if self.roi[0] != self.roi[-2]:
            raise BadInputError(f"--roi: {' '.join(map(str, self.roi))}; the first two edges must be equal, because "
                                "the random 90° rotations (§9.5) turn crops in that plane")
        low, high = self.intensity
        if not low < high:
            raise BadInputError(f"--intensity: {low:g} {high:g}; LOW must be below HIGH (HU)")

    def check_new_run(self) -> None:
        """Exactly one data source, complete; and --out."""
        chosen = [k for k in SOURCE_OPTIONS if getattr(self, k)]
        if self.labels and not self.images:
            raise BadInputError("--labels needs --images (the folder of the images the labels belong to)")
        if len(chosen) != 1:
            raise BadInputError("give exactly one data source: --images DIR --labels DIR, --dataset dataset.json or "
                                "--segmentations DIR" + (f" (got {', '.join(map(flag, chosen))})" if chosen else ""))
        if chosen == ["images"] and not self.labels:
            raise BadInputError("--images needs --labels (the folder of label maps with the same names)")
        if chosen == ["images"] and not self.label_table:
            raise BadInputError("--images/--labels: give --label-table labels.json naming each label value (e.g. "
                                '{"labels": [{"value": 1, "name": "liver"}]}); label maps carry no names')
        if self.out is None:
            raise BadInputError("--out required for a new run (or --resume RUN_DIR to continue one)")
        if self.encoder != "full" and not self.pretrained:
            raise BadInputError(f"--encoder {self.encoder} needs --pretrained: it keeps the pre-trained encoder fixed "
                                "(at first), and a random one has nothing to keep")


# ---- the command line -----------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser, cls: type[RunOptions]) -> None:
    """One option per field of `cls`, plus --resume and --check-plan. Every option defaults to None: "not given" (see
    `resolve`)."""
    groups, shared = {}, {f.name for f in dataclasses.fields(RunOptions)}
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name in shared):  # the command's own options first
        group = f.metadata["group"]
        if group and group not in groups:
            groups[group] = parser.add_argument_group(group)
        shown = "" if default_of(f) in (None, {}) else f" (default {_show_default(default_of(f))})"
        (groups[group] if group else parser).add_argument(flag(f.name), help=f.metadata["help"] + shown,
                                                          **f.metadata["arg"])
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run from checkpoints/last.pt with its "
                        "saved options")
    parser.add_argument("--check-plan", action="store_true", help="only plan the run's memory (the options checked "
                        "and the model built as for the run, with --resume the resumed run's options; no image and no "
                        "weights read): one result event with the estimate, the memory free now on the run's device, "
                        "and whether it fits (with activation checkpointing if needed); exit 0 if it fits, else 2 with "
                        "what would fit. Writes nothing")


def resolve(cls: type[RunOptions], args: argparse.Namespace) -> tuple[RunOptions, RunDir | None]:
    """The checked options and, for --resume, the run folder.

    Raises:
        BadInputError: a bad or conflicting option, or a new run without its required options.
    """
    given = given_options(cls, args)
    if args.resume:
        resume = RunDir(absolute_paths(args.resume))
        opts = resume_options(cls, resume, given)
        opts.validate()
        return opts, resume
    if cls is FinetuneOptions and "val_cases" in given and "val_fraction" in given:
        raise BadInputError("give --val-cases or --val-fraction, not both")
    opts = cls(**given)
    opts.check_new_run()
    opts = opts.completed()
    opts.validate()
    return opts, None


def given_options(cls: type[RunOptions], args: argparse.Namespace) -> dict:
    """The options given on the command line, as field values (paths absolute)."""
    given = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            value = absolute_paths(value) if f.metadata["path"] else value
            given[f.name] = f.metadata["parse"](value) if f.metadata["parse"] else value
    return given


def resume_options(cls: type[RunOptions], run: RunDir, given: dict) -> RunOptions:
    """The options of the run to resume (`mim3d COMMAND --resume RUN_DIR`), updated with those given again.

    Raises:
        BadInputError: not a run of this command, still active, no checkpoint yet, or a given option that may not
            change and differs from the saved one.
    """
    config = read_json(run.config)
    if not run.path.is_dir() or config is None or config.get("command") != cls.COMMAND:
        what = {"pretrain": "pre-training", "finetune": "fine-tuning"}[cls.COMMAND]
        raise BadInputError(f"--resume {run.path}: not a {what} run folder (no readable config.json from "
                            f"mim3d {cls.COMMAND})")
    status = read_status(run.path)
    if status["state"] in ACTIVE_STATES:
        raise BadInputError(f"--resume {run.path}: the run is still {status['state']} (pid {status.get('pid')} on "
                            f"{status.get('host')}); stop it first (touch {run.stop_file})")
    if not run.checkpoint("last").exists():
        raise BadInputError(f"--resume {run.path}: no checkpoints/last.pt (it ended before its first checkpoint); "
                            "start it again as a new run")
    saved = cls.from_dict(config["options"])
    may_change = {f.name for f in dataclasses.fields(cls) if f.metadata["may_change"]}
    conflicts = [f"{flag(k)} {show(v)} (the run has {show(getattr(saved, k))})"
                 for k, v in given.items() if k not in may_change and v != getattr(saved, k)]
    if conflicts:
        hint = " (e.g. with --init <run>/checkpoints/last.pt)" if cls is PretrainOptions else ""
        raise BadInputError(f"--resume {run.path}: {'; '.join(conflicts)}. A resumed run keeps its options so that "
                            f"it continues exactly; start a new run{hint} to change them")
    return dataclasses.replace(saved, **given)


# ---- values ---------------------------------------------------------------------------------------------------------

def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def show(value) -> str:
    """An option value as a person would type it."""
    if isinstance(value, tuple):
        return json.dumps(list(value))
    return json.dumps(value) if not isinstance(value, str) else value


def _show_default(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else f"{value:g}" if isinstance(value, float) else (
        str(value))


def _item(item) -> str:
    """One --override KEY=VALUE (from a dict item) or one repeated value."""
    return f"{item[0]}={json.dumps(item[1])}" if isinstance(item, tuple) else str(item)


def absolute_paths(value):
    """A path, or a list of them, made absolute (~ expanded), as str."""
    return [absolute_paths(v) for v in value] if isinstance(value, list) else str(Path(value).expanduser().absolute())


def default_cache_dir() -> Path:
    home = os.environ.get("MIM3D_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "mim3d") / "cache"


def parse_overrides(items: list[str]) -> dict:
    """["depths=[1,1,1,1]", "alignment_form=byol"] -> {"depths": [1, 1, 1, 1], "alignment_form": "byol"}."""
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise BadInputError(f"--override {item!r}: expected KEY=VALUE, e.g. --override level2_count=2")
        try:
            overrides[key.strip()] = json.loads(text)
        except ValueError:
            overrides[key.strip()] = text
    return overrides


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


def _three(key: str, values: list) -> tuple:
    """One value (the same on every axis) or three, positive."""
    problem = positive_values(tuple(values))
    if problem:
        raise BadInputError(f"--{key}: {' '.join(map(str, values))}; {problem}")
    return tuple(values * 3 if len(values) == 1 else values)


__all__ = ["RunOptions", "PretrainOptions", "FinetuneOptions", "add_arguments", "resolve", "resume_options",
           "default_cache_dir", "parse_overrides", "parse_label_map", "absolute_paths", "flag"]
