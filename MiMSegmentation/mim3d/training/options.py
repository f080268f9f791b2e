"""The command-line options of `mim3d pretrain`, their defaults, and the checks on them before a run is written.

Options are resolved into one plain dict (config.json "options"), which `--resume` reads back: an option given again
on resume must agree with the saved one, except those in RESUME_MAY_CHANGE.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from ..errors import BadInputError
from ..models import PRETRAINING_METHODS
from ..runs import ACTIVE_STATES, RunDir, read_json, read_status

DEFAULTS = {
    "data": None, "out": None,
    "method": "mim", "preset": "base", "override": {},
    "epochs": 800, "batch_size": 1, "accum": 1,  # MIM_METHOD §8.3: 800 epochs
    "blr": 1e-4, "lr": None, "min_lr": 0.0, "warmup_epochs": None, "weight_decay": 0.05,  # §8.3
    "device": "auto", "amp": None, "workers": 2, "cache": None, "init": None, "seed": 0,
    "max_steps": None, "checkpoint_every": 100, "log_every": 10,  # §8.4: a kept checkpoint every 100 epochs
}
# Options that only change how the run is executed or observed, not what it computes (batch_size: only together
# with the number of processes, keeping the effective batch; checked by check_resume_matches).
RESUME_MAY_CHANGE = {"device", "amp", "workers", "cache", "max_steps", "checkpoint_every", "log_every", "batch_size"}
WARMUP_FRACTION = 0.05  # default warm-up: 5% of the epochs, the official 40 of 800 (§8.3)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--data", action="append", metavar="DIR", help="folder of scans, searched recursively (repeatable)")
    add("--out", metavar="RUN_DIR", help="new run folder (must not hold a run)")
    add("--resume", metavar="RUN_DIR", help="continue this run from checkpoints/last.pt with its saved options")
    add("--check-data", action="store_true", help="only find the scans under --data and report them (a result "
        "event with the discovery summary: count, formats, spacings, skipped files and why); writes nothing")
    add("--method", choices=PRETRAINING_METHODS, help="pre-training method (default mim)")
    add("--preset", choices=("small", "base"), help="model size: base = the papers, small = CPU-sized (default base)")
    add("--override", action="append", metavar="KEY=VALUE",
        help="model config field, value as JSON when it parses (e.g. depths=[1,1,1,1]); repeatable")
    add("--epochs", type=int, help="epochs of the schedule (default 800)")
    add("--batch-size", type=int, help="volumes per micro-batch and process (default 1)")
    add("--accum", type=int, help="micro-batches accumulated per optimiser step (default 1)")
    add("--blr", type=float, help="base learning rate: lr = blr × effective batch / 256 (default 1e-4)")
    add("--lr", type=float, help="absolute learning rate, instead of the --blr rule")
    add("--min-lr", type=float, help="end of the cosine schedule (default 0)")
    add("--warmup-epochs", type=float, help="linear warm-up, in epochs (default 5%% of --epochs: 40 of 800)")
    add("--weight-decay", type=float, help="AdamW weight decay on weights, not biases/norms (default 0.05)")
    add("--device", choices=("auto", "cpu", "cuda"), help="default auto: CUDA when available")
    add("--amp", action=argparse.BooleanOptionalAction,
        help="mixed precision (default on for CUDA: bf16, or fp16 + GradScaler; ignored on the CPU: slower there)")
    add("--workers", type=int, help="data-loading processes (default 2; 0 loads in the training process)")
    add("--cache", metavar="DIR", help="pre-processed volume cache (default $MIM3D_HOME/cache, else "
        "~/.cache/mim3d/cache)")
    add("--init", metavar="CHECKPOINT", help="start from these weights: official MiM checkpoint or a mim3d one")
    add("--seed", type=int, help="seed of the initial weights, data order, crops and masks (default 0)")
    add("--max-steps", type=int, help="end after this many optimiser steps in all (the schedule still spans "
        "--epochs; kept by --resume unless given again)")
    add("--checkpoint-every", type=int, metavar="EPOCHS", help="keep checkpoints/epoch-N.pt every N epochs "
        "(default 100; last.pt is written every epoch)")
    add("--log-every", type=int, metavar="STEPS", help="metrics.jsonl / TensorBoard every N steps (default 10)")


def resolve(args: argparse.Namespace) -> tuple[dict, RunDir | None]:
    """The resolved options and, for --resume, the run folder. Raises BadInputError on a bad or conflicting option."""
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("resume", "check_data")}
    if "override" in given:
        given["override"] = parse_overrides(given["override"])
    for key in ("data", "out", "init", "cache"):
        if key in given:
            given[key] = absolute_paths(given[key])
    if args.resume:
        resume = RunDir(absolute_paths(args.resume))
        opts = resume_options(resume, given, command="pretrain", may_change=RESUME_MAY_CHANGE,
                              new_run_hint=" (e.g. with --init <run>/checkpoints/last.pt)")
        _check_numbers(opts)
        return opts, resume
    missing = [f"--{k}" for k in ("data", "out") if k not in given]
    if missing:
        raise BadInputError(f"{' and '.join(missing)} required for a new run (or --resume RUN_DIR to continue one)")
    opts = {**DEFAULTS, **given}
    opts["cache"] = opts["cache"] or str(default_cache_dir())
    if opts["warmup_epochs"] is None:
        opts["warmup_epochs"] = WARMUP_FRACTION * opts["epochs"]
    _check_numbers(opts)
    return opts, None


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


def _check_numbers(opts: dict) -> None:
    for key in ("epochs", "batch_size", "accum", "checkpoint_every", "log_every"):
        if opts[key] < 1:
            raise BadInputError(f"--{key.replace('_', '-')}: {opts[key]}; must be at least 1")
    if opts["workers"] < 0:
        raise BadInputError(f"--workers: {opts['workers']}; must be 0 or more")
    if opts["max_steps"] is not None and opts["max_steps"] < 1:
        raise BadInputError(f"--max-steps: {opts['max_steps']}; must be at least 1")
    for key in ("blr", "lr", "min_lr", "weight_decay"):
        if opts[key] is not None and not (math.isfinite(opts[key]) and opts[key] >= 0):
            raise BadInputError(f"--{key.replace('_', '-')}: {opts[key]}; must be a finite number >= 0")
    if not 0 <= opts["warmup_epochs"] <= opts["epochs"]:
        raise BadInputError(f"--warmup-epochs: {opts['warmup_epochs']}; must lie between 0 and --epochs "
                            f"{opts['epochs']}")


def resume_options(run: RunDir, given: dict, *, command: str, may_change: set[str], new_run_hint: str = "") -> dict:
    """The options of the run to resume (`mim3d COMMAND --resume RUN_DIR`), updated with those given again.

    Raises:
        BadInputError: not a run of `command`, still active, no checkpoint yet, or a given option outside
            `may_change` that differs from the saved one.
    """
    config = read_json(run.config)
    if not run.path.is_dir() or config is None or config.get("command") != command:
        what = {"pretrain": "pre-training", "finetune": "fine-tuning"}[command]
        raise BadInputError(f"--resume {run.path}: not a {what} run folder (no readable config.json from "
                            f"mim3d {command})")
    status = read_status(run.path)
    if status["state"] in ACTIVE_STATES:
        raise BadInputError(f"--resume {run.path}: the run is still {status['state']} (pid {status.get('pid')} on "
                            f"{status.get('host')}); stop it first (touch {run.stop_file})")
    if not run.checkpoint("last").exists():
        raise BadInputError(f"--resume {run.path}: no checkpoints/last.pt (it ended before its first checkpoint); "
                            "start it again as a new run")
    saved = config["options"]
    conflicts = [f"--{k.replace('_', '-')} {_show(v)} (the run has {_show(saved.get(k))})"
                 for k, v in given.items() if k not in may_change and v != saved.get(k)]
    if conflicts:
        raise BadInputError(f"--resume {run.path}: {'; '.join(conflicts)}. A resumed run keeps its options so that "
                            f"it continues exactly; start a new run{new_run_hint} to change them")
    return {**saved, **given}


def _show(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def optimisation_plan(opts: dict, sharding) -> dict:
    """Effective batch, learning rate and step counts (config.json "optimization"), with the LR arithmetic spelled out.

    Raises:
        BadInputError: fewer volumes than one optimiser step needs.
    """
    spe, batch = sharding.steps_per_epoch, sharding.global_batch
    if spe < 1:
        raise BadInputError(f"{sharding.num_items} usable volumes, but one optimiser step takes batch "
                            f"{opts['batch_size']} × accum {opts['accum']} × {_processes(sharding.world.size)} = "
                            f"{batch}; lower --batch-size or --accum, or add volumes")
    lr = opts["lr"] if opts["lr"] is not None else opts["blr"] * batch / 256
    rule = ("given with --lr" if opts["lr"] is not None else
            f"base lr {opts['blr']:g} × effective batch {batch} / 256")
    scheduled = opts["epochs"] * spe
    return {"effective_batch": batch, "batch_size": opts["batch_size"], "accum": opts["accum"],
            "world_size": sharding.world.size, "base_lr": opts["blr"], "lr": lr, "lr_rule": rule,
            "lr_note": (f"lr {lr:.4g} ({rule}; effective batch = batch {opts['batch_size']} × accum {opts['accum']} × "
                        f"{_processes(sharding.world.size)}). The official scripts also count sw_batch_size 4 "
                        "(MIM_METHOD §12.6): the same base lr gives them 4× this lr."),
            "min_lr": opts["min_lr"], "weight_decay": opts["weight_decay"], "betas": [0.9, 0.95],
            "epochs": opts["epochs"], "warmup_epochs": opts["warmup_epochs"],
            "warmup_steps": opts["warmup_epochs"] * spe, "steps_per_epoch": spe, "scheduled_steps": scheduled,
            "total_steps": min(scheduled, opts["max_steps"] or scheduled),
            "volumes_unused_per_epoch": sharding.num_items - spe * batch}


def check_new_run_folder(out: Path) -> None:
    """--out must be new or an empty folder, so that a run never mixes with another one's files."""
    run = RunDir(out)
    if run.holds_run():
        state = read_status(out)["state"]
        raise BadInputError(f"--out {out}: already holds a run (state {state}); continue it with --resume {out}, or "
                            "choose another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInputError(f"--out {out}: exists and is not an empty folder; choose a new folder for the run")


def volume_key(volume) -> str:
    """How config.json lists a volume: its path, plus ":<series UID>" for a DICOM series."""
    return str(volume.path) + (f":{volume.series_id}" if volume.series_id else "")


def check_resume_matches(run: RunDir, discovery, plan: dict) -> None:
    """The data and the effective batch must be those the run started with, or it would not continue exactly."""
    config = read_json(run.config)
    saved = config["data"]["volumes"]
    found = [volume_key(v) for v in discovery.volumes]
    if found != saved:
        added, removed = sorted(set(found) - set(saved)), sorted(set(saved) - set(found))
        raise BadInputError(f"--resume {run.path}: the data changed since the run started ({len(added)} volumes "
                            f"added, e.g. {added[:2]}; {len(removed)} gone, e.g. {removed[:2]}); a resumed run needs "
                            "the same volumes. Start a new run with --init <run>/checkpoints/last.pt instead")
    if plan["effective_batch"] != config["optimization"]["effective_batch"]:
        raise BadInputError(f"--resume {run.path}: effective batch {plan['effective_batch']} (batch × accum × "
                            f"processes) differs from the run's {config['optimization']['effective_batch']}; keep "
                            "batch × processes as it was")


def _processes(count: int) -> str:
    return f"{count} process" + ("es" if count > 1 else "")
