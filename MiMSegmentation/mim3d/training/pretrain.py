"""Self-supervised pre-training (MiM, MAE or SimMIM) on folders of scans, as a run folder (mim3d.runs).

    mim3d pretrain --data /scans --out runs/mim-1 --preset small --epochs 100          # CPU or one GPU
    mim3d pretrain --resume runs/mim-1                                                  # continue after a stop or kill
    torchrun --nproc_per_node 4 -m mim3d pretrain --data /scans --out runs/mim-2        # 4 GPUs: batch is per process
    mim3d pretrain --data /scans --out runs/mim-3 --init checkpoint-final.pth          # continue the official weights

Learning rate (METHOD.md §8.3): lr = base lr × effective batch / 256, effective batch = batch × accum × processes,
unless --lr gives it directly. The official scripts also multiply by their unused sw_batch_size 4 (§12.6), so their
runs correspond to --blr 4e-4 here. Stop with SIGTERM, Ctrl-C or `touch RUN_DIR/STOP`: the step in progress finishes,
checkpoints/last.pt is saved, the run ends "stopped" (exit 0), and --resume continues it exactly.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import __version__, memory, run_options
from ..data import Discovery, discover_volumes, pretraining_dataset
from ..errors import BadInputError
from ..models import build_pretrainer, load_pretrained
from ..models.checkpoints import read_checkpoint
from ..presets import config_to_dict
from ..protocol import Emitter
from ..run_options import PretrainOptions, absolute_paths
from ..runs import RunDir, now_iso, read_json
from ..runtime import keep_freed_memory
from . import distributed, engine
from .distributed import Sharding, World, derive_seed, unwrap
from .lifecycle import check_new_run_folder, finish, run_lifecycle
from .plans import TrainingPlan, choose_plan, report_plan, step_footprint, use_activation_checkpointing
from .run_writer import RunWriter, StopController

log = logging.getLogger("mim3d.training")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    run_options.add_arguments(parser, PretrainOptions)
    parser.add_argument("--check-data", action="store_true", help="only find the scans under --data and report them "
                        "(a result event with the discovery summary: count, formats, spacings, skipped files and why); "
                        "writes nothing")


def run(args: argparse.Namespace, emitter: Emitter) -> None:
    if args.check_data and args.check_plan:
        raise BadInputError("--check-data and --check-plan: give one of them (the scans found, or the memory plan)")
    if args.check_data:
        check_data(args, emitter)
        return
    if args.check_plan:
        check_plan(args, emitter)
        return
    distributed.run_on_every_rank(args, emitter, prepare, train)


@dataclass
class Setup:
    """Everything a run needs, built and checked before anything is written."""

    opts: PretrainOptions  # resolved (config.json "options")
    resume: RunDir | None
    world: World
    device: torch.device
    precision: str  # fp32, bf16 or fp16
    discovery: Discovery
    model: nn.Module
    dataset: Dataset
    sharding: Sharding
    plan: dict  # config.json "optimization"
    memory_plan: TrainingPlan  # config.json "plan"

    @property
    def run_dir(self) -> RunDir:
        return self.resume or RunDir(self.opts.out)


def check_data(args: argparse.Namespace, emitter: Emitter) -> None:
    """--check-data: the volumes a run on --data would train on and the files it would skip, as one result event
    {"folders": [...], "summary": Discovery.summary(), "description": the same for people}; nothing is written, and
    options other than --data are not looked at. No usable volume is bad input, as for a run."""
    if args.resume:
        raise BadInputError("--check-data checks the --data folders of a new run; it does not go with --resume")
    if not args.data:
        raise BadInputError("--check-data needs --data DIR (the folders of scans to check)")
    folders = absolute_paths(args.data)
    discovery = discover_volumes(folders)
    print(discovery.describe(), file=sys.stderr, flush=True)
    emitter.result(folders=folders, summary=discovery.summary(), description=discovery.describe())


def check_plan(args: argparse.Namespace, emitter: Emitter) -> None:
    """--check-plan: the memory plan of the run these options (or --resume's) describe, on the device it would use,
    as one result event (plans.report_plan); exit 2 when it does not fit. The options and --out are checked as for
    the run and the model is built the same way, but the scans (see --check-data) and --init are not read, and
    nothing is written."""
    opts, resume = run_options.resolve(PretrainOptions, args)
    if resume is None:
        check_new_run_folder(Path(opts.out))
    device = distributed.select_device(opts.device, distributed.world_from_env())
    model = _build_model(opts)
    report_plan(lambda budget: plan_memory(opts, model, budget), device, emitter)


# ---- before anything is written -------------------------------------------------------------------------------------

def prepare(args: argparse.Namespace, world: World, emitter: Emitter) -> Setup:
    """Check every input and build the model and data. Raises BadInputError, naming the input, on any problem."""
    opts, resume = run_options.resolve(PretrainOptions, args)
    device = distributed.select_device(opts.device, world)
    discovery = _discover(opts.data, emitter, world)
    model = _build_model(opts)
    sharding = Sharding(len(discovery.volumes), opts.batch_size, opts.accum, world, opts.seed)
    plan = optimisation_plan(opts, sharding)
    if resume is None:
        check_new_run_folder(Path(opts.out))
        if opts.init:
            log.info("--init: %s", load_pretrained(model, opts.init).summary())
    else:
        check_resume_matches(resume, discovery, plan)
    precision, note = engine.choose_precision(device, opts.amp)
    if note:
        log.warning(note)
    log.info("%s", plan["lr_note"])
    memory_plan = plan_memory(opts, model, memory.budget(device))
    log.info("%s", memory_plan.describe())
    emitter.progress("plan", 1.0, memory_plan.describe())
    dataset = pretraining_dataset(discovery.volumes, _crop_size(model), Path(opts.cache), seed=opts.seed)
    return Setup(opts, resume, world, device, precision, discovery, model, dataset, sharding, plan, memory_plan)


def _crop_size(model: nn.Module) -> int:
    return getattr(model.config, "crop_size", model.config.input_size)  # MiM: 2 × input_size (§4.1)


def plan_memory(opts: PretrainOptions, model: nn.Module, budget: memory.Budget) -> TrainingPlan:
    """Whether one step of --batch-size volumes fits ``budget``, with MiM's activation checkpointing if it must
    (training/plans.py; --override activation_checkpointing=true|false fixes the choice); turns it on in ``model``.

    Raises:
        BadInputError: it does not fit; the message says what would.
    """
    crop = _crop_size(model)
    inputs = (torch.zeros(opts.batch_size, 1, crop, crop, crop), None,
              model.draw_noise(opts.batch_size, torch.Generator().manual_seed(0)))

    @functools.cache
    def footprint(checkpointing: bool):
        return step_footprint(model, inputs, lambda out: out["loss"], checkpointing=checkpointing)

    def would_fit(room: int) -> str:
        per_volume = footprint(opts.method == "mim").activations / opts.batch_size
        fits = int(room // per_volume)
        if fits >= 1:
            return (f"--batch-size {fits} would fit (with --accum {-(-opts.batch_size // fits)} for about the same "
                    "effective batch)")
        return "--preset small would fit" if opts.preset == "base" else "not even one volume fits"

    chosen = choose_plan(footprint, budget, requested=opts.override.get("activation_checkpointing"),
                         can_checkpoint=opts.method == "mim", would_fit=would_fit,
                         what=f"{opts.method} {opts.preset} pre-training at batch {opts.batch_size}")
    if chosen.activation_checkpointing:
        use_activation_checkpointing(model)
    return chosen


def _discover(folders: tuple[str, ...], emitter: Emitter, world: World) -> Discovery:
    discovery = discover_volumes(folders)
    if world.is_main:
        print(discovery.describe(), file=sys.stderr, flush=True)
    summary = discovery.summary()
    emitter.progress("data", 1.0, f"{summary['count']} volumes, {len(summary['skipped'])} skipped")
    return discovery


def _build_model(opts: PretrainOptions) -> nn.Module:
    torch.manual_seed(derive_seed(opts.seed, "init"))  # the same initial weights in every process
    return build_pretrainer(opts.method, opts.preset, **opts.override)


# ---- the run --------------------------------------------------------------------------------------------------------

def train(s: Setup, emitter: Emitter) -> None:
    """Write the run folder and train; a stop request ends it "stopped" (no exception), anything else "failed"."""
    writer = RunWriter(s.run_dir, active=s.world.is_main, emitter=emitter, command="pretrain", epochs=s.opts.epochs,
                       steps_per_epoch=s.plan["steps_per_epoch"], total_steps=s.plan["total_steps"],
                       log_every=s.opts.log_every)
    if s.device.type == "cpu":
        keep_freed_memory()  # steps reuse the same large buffers (mim3d.runtime)
    with run_lifecycle(writer, None if s.resume else _config_json(s)) as stop:
        trainer = _trainer(s, writer, stop)
        if s.resume:
            engine.restore(trainer, read_checkpoint(s.run_dir.checkpoint("last"))[1])
        writer.open(trainer.step, preamble=_preamble(s, trainer.step))
        writer.set_state("starting", f"step {trainer.step} of {s.plan['total_steps']}")
        batches = functools.partial(distributed.epoch_batches, s.dataset, s.sharding, s.opts.workers, s.device)
        meta = {"method": s.opts.method, "config": config_to_dict(s.model.config), "run": s.opts.to_dict()}
        state = engine.fit(trainer, batches, steps_per_epoch=s.plan["steps_per_epoch"], epochs=s.opts.epochs,
                           checkpoint_every=s.opts.checkpoint_every, checkpoint_meta=meta)
        distributed.barrier(s.world)
    finish(writer, trainer, state, s.plan, emitter)


def _trainer(s: Setup, writer: RunWriter, stop: StopController) -> engine.Trainer:
    model = distributed.wrap_model(s.model.to(s.device), s.world, s.device)
    optimizer = torch.optim.AdamW(engine.param_groups(s.model, s.opts.weight_decay), lr=s.plan["lr"],
                                  betas=engine.ADAMW_BETAS)
    schedule = functools.partial(engine.lr_at, lr=s.plan["lr"], min_lr=s.opts.min_lr,
                                 warmup_steps=s.plan["warmup_steps"], total_steps=s.plan["scheduled_steps"])
    loss_fn = functools.partial(_loss, seed=s.opts.seed, device=s.device)
    return engine.Trainer(model, optimizer, loss_fn, schedule, s.device, s.precision, s.opts.accum, s.world, stop,
                          writer, s.plan["total_steps"], s.sharding.global_batch)


def _loss(model, batch, epoch: int, *, seed: int, device: torch.device) -> dict:
    """The pre-training loss of one micro-batch. Each volume's masks are drawn from (seed, epoch, its position in the
    epoch), so they do not depend on how the global batch is split over processes and micro-batches."""
    crops, positions = batch
    draws = [unwrap(model).draw_noise(1, torch.Generator().manual_seed(derive_seed(seed, "noise", epoch, p)))
             for p in positions]
    noise = {name: torch.cat([draw[name] for draw in draws]) for name in draws[0]}  # sample-major, as draw_noise(B)
    return model(crops.to(device, non_blocking=True), noise=noise)


def _config_json(s: Setup) -> dict:
    return {"command": "pretrain", "created": now_iso(),
            "versions": {"mim3d": __version__, "torch": torch.__version__, "python": sys.version.split()[0]},
            "options": s.opts.to_dict(),
            "model": {"method": s.opts.method, "preset": s.opts.preset, "config": config_to_dict(s.model.config)},
            "data": {"folders": list(s.opts.data), "summary": s.discovery.summary(),
                     "volumes": [volume_key(v) for v in s.discovery.volumes]},
            "optimization": s.plan, "plan": s.memory_plan.to_config(),
            "runtime": {"device": s.device.type, "precision": s.precision, "world_size": s.world.size}}


def _preamble(s: Setup, step: int) -> str:
    """What log.txt starts each process's section with (stderr has shown it already)."""
    action = f"resuming at step {step}" if s.resume else "new run"
    return (f"==== mim3d pretrain {s.opts.method} ({s.opts.preset}): {action}, {now_iso()}\n"
            f"{s.discovery.describe()}\n{s.plan['lr_note']}\n{s.memory_plan.describe()}\n"
            f"precision {s.precision}, {s.plan['steps_per_epoch']} steps per epoch, "
            f"{s.plan['total_steps']} steps to run in all\n")


# ---- the optimisation plan and what a resumed run must keep ---------------------------------------------------------

def optimisation_plan(opts: PretrainOptions, sharding: Sharding) -> dict:
    """Effective batch, learning rate and step counts (config.json "optimization"), with the LR arithmetic spelled out.

    Raises:
        BadInputError: fewer volumes than one optimiser step needs.
    """
    spe, batch = sharding.steps_per_epoch, sharding.global_batch
    if spe < 1:
        raise BadInputError(f"{sharding.num_items} usable volumes, but one optimiser step takes batch "
                            f"{opts.batch_size} × accum {opts.accum} × {_processes(sharding.world.size)} = "
                            f"{batch}; lower --batch-size or --accum, or add volumes")
    lr = opts.lr if opts.lr is not None else opts.blr * batch / 256
    rule = "given with --lr" if opts.lr is not None else f"base lr {opts.blr:g} × effective batch {batch} / 256"
    scheduled = opts.epochs * spe
    return {"effective_batch": batch, "batch_size": opts.batch_size, "accum": opts.accum,
            "world_size": sharding.world.size, "base_lr": opts.blr, "lr": lr, "lr_rule": rule,
            "lr_note": (f"lr {lr:.4g} ({rule}; effective batch = batch {opts.batch_size} × accum {opts.accum} × "
                        f"{_processes(sharding.world.size)}). The official scripts also count sw_batch_size 4 "
                        "(METHOD.md §12.6): the same base lr gives them 4× this lr."),
            "min_lr": opts.min_lr, "weight_decay": opts.weight_decay, "betas": list(engine.ADAMW_BETAS),
            "epochs": opts.epochs, "warmup_epochs": opts.warmup_epochs,
            "warmup_steps": opts.warmup_epochs * spe, "steps_per_epoch": spe, "scheduled_steps": scheduled,
            "total_steps": min(scheduled, opts.max_steps or scheduled),
            "volumes_unused_per_epoch": sharding.num_items - spe * batch}


def volume_key(volume) -> str:
    """How config.json lists a volume: its path, plus ":<series UID>" for a DICOM series."""
    return str(volume.path) + (f":{volume.series_id}" if volume.series_id else "")


def check_resume_matches(run: RunDir, discovery: Discovery, plan: dict) -> None:
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
