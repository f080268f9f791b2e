"""Fine-tuning a segmentation network on labelled cases (METHOD.md §9, §14.2): a run folder (mim3d.runs) that ends
with a model package `mim3d segment` uses directly.

    mim3d finetune --images imagesTr --labels labelsTr --label-table labels.json --out runs/ft-1 --pretrained runs/mim-1
    mim3d finetune --dataset Task09_Spleen/dataset.json --arch unetr --pretrained mae.pt --out runs/ft-2
    mim3d finetune --segmentations segmentations/ --preset small --epochs 200 --out runs/ft-3
    mim3d finetune --resume runs/ft-1                                   # continue after a stop or kill

Recipe (BTCV, §9.5): crops of --roi around labelled and background voxels, DiceCE loss (softmax, one-hot targets,
squared_pred, smooth_nr 0, smooth_dr 1e-6), AdamW (0.9, 0.999) with weight decay 1e-5 on weights, lr 1e-4 with a
linear warm-up and a cosine to --min-lr, gradient norm clipped to 5, mixed precision on CUDA. Every --val-every epochs
and at the end, the validation cases are segmented with sliding windows and scored with the Dice of each label
(validation.py). The best mean Dice is kept as checkpoints/best.pt and exported as the model package RUN_DIR/model
(model.json + weights.safetensors), again at the end with the run's final provenance.

--pretrained takes an official MiM checkpoint, a mim3d checkpoint, or a finished or stopped `mim3d pretrain` run
folder, whose checkpoints/last.pt it loads: the run's final weights (mim3d.runs.pretrained_checkpoint).
MiM encoders fine-tune as mim-unetr, MAE and SimMIM encoders as unetr (§14.2), with the --preset they were pre-trained
with. It also takes a mim3d model package (folder or .zip), to adapt a segmenter to other scans or labels: encoder and
decoder load, and the output head keeps the rows of the labels whose names the package has
(mim3d.package.load_package_start). --encoder full|frozen|gradual says what of the encoder trains (encoder_modes.py).
Before the run folder is written, every case is checked and pre-processed once (through the cache), and the weights
are loaded, so bad input ends with exit code 2 and leaves nothing behind. Stop with SIGTERM, Ctrl-C or
`touch RUN_DIR/STOP`: the step finishes, checkpoints/last.pt is saved and --resume continues the run exactly.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.data import list_data_collate
from monai.losses import DiceCELoss

from .. import memory, run_options
from ..errors import BadInputError
from ..models import build_segmenter, load_pretrained
from ..models.checkpoints import read_checkpoint, save_checkpoint
from ..package import is_package, load_package_start
from ..presets import MiMUNETRConfig, UNETRConfig, config_to_dict
from ..presets import resolve as resolve_config
from ..protocol import Emitter
from ..run_options import FinetuneOptions
from ..runs import RunDir, now_iso, pretrained_checkpoint, read_json
from . import distributed, engine, finetune_data
from .distributed import Sharding, World, derive_seed, unwrap
from .encoder_modes import EncoderMode
from .finetune_writer import (
    PACKAGE_DIR,
    FinetuneRunWriter,
    best_record,
    export_package,
    package_inference,
    package_preprocessing,
)
from .lifecycle import check_new_run_folder, finish, run_lifecycle
from .plans import (
    CRITERION_COPIES,
    TrainingPlan,
    choose_plan,
    report_plan,
    step_footprint,
    use_activation_checkpointing,
)
from .validation import summarize, validate_cases

log = logging.getLogger("mim3d.training")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    run_options.add_arguments(parser, FinetuneOptions)


def run(args: argparse.Namespace, emitter: Emitter) -> None:
    if args.check_plan:
        check_plan(args, emitter)
        return
    distributed.run_on_every_rank(args, emitter, prepare, train)


def check_plan(args: argparse.Namespace, emitter: Emitter) -> None:
    """--check-plan: the memory plan of the run these options (or --resume's) describe, on the device it would use,
    as one result event (plans.report_plan); exit 2 when it does not fit. The options, --out and the data source are
    checked as for the run and the model is built the same way, but no image and no weights are read (the plan
    needs only the label table's class count), and nothing is written."""
    opts, resume = run_options.resolve(FinetuneOptions, args)
    if resume is None:
        check_new_run_folder(Path(opts.out))
    device = distributed.select_device(opts.device, distributed.world_from_env())
    table = finetune_data.label_table(opts)
    package_inference(opts, table)
    model, _ = _build_model(opts, table)
    encoder = EncoderMode.of(opts.encoder, model, opts.arch, opts.epochs)  # the plan uses no step count
    report_plan(lambda budget: plan_memory(opts, model, encoder, table.num_classes, budget), device, emitter)


@dataclass
class Setup:
    """Everything a fine-tuning run needs, built and checked before anything is written."""

    opts: FinetuneOptions  # resolved (config.json "options")
    resume: RunDir | None
    world: World
    device: torch.device
    precision: str  # fp32, bf16 or fp16
    data: finetune_data.FinetuneData
    model: torch.nn.Module
    model_config: MiMUNETRConfig | UNETRConfig
    datasets: tuple  # (training, validation)
    sharding: Sharding
    plan: dict  # config.json "optimization"
    pretrained: dict | None  # what --pretrained loaded (config.json "pretrained")
    encoder: EncoderMode  # what of the encoder trains when (config.json "encoder")
    memory_plan: TrainingPlan  # config.json "plan"

    @property
    def run_dir(self) -> RunDir:
        return self.resume or RunDir(self.opts.out)


# ---- before anything is written -------------------------------------------------------------------------------------

def prepare(args: argparse.Namespace, world: World, emitter: Emitter) -> Setup:
    """Check every input, read every case once and build the model. Raises BadInputError, naming the input."""
    opts, resume = run_options.resolve(FinetuneOptions, args)
    device = distributed.select_device(opts.device, world)
    data = finetune_data.load_data(opts)
    log.info("%s", data.describe())
    package_inference(opts, data.table)  # --keep-largest names labels of the table
    model, model_config = _build_model(opts, data.table)
    sharding = Sharding(len(data.train), opts.batch_size, opts.accum, world, opts.seed)
    plan = optimisation_plan(opts, sharding)
    encoder = EncoderMode.of(opts.encoder, model, opts.arch, plan["scheduled_steps"])
    if opts.encoder == "gradual" and world.distributed:
        raise BadInputError("--encoder gradual runs in one process only (DDP fixes the trained parameters when it "
                            "starts); use --encoder frozen or full with several processes")
    pretrained = None
    if resume is None:
        check_new_run_folder(Path(opts.out))
        pretrained = _load_pretrained(model, opts, data.table)
    else:
        finetune_data.check_resume_matches(read_json(resume.config), data, resume.path)
    precision, note = engine.choose_precision(device, opts.amp)
    if note:
        log.warning(note)
    log.info("%s", plan["lr_note"])
    memory_plan = plan_memory(opts, model, encoder, data.table.num_classes, memory.budget(device))
    log.info("%s", memory_plan.describe())
    emitter.progress("plan", 1.0, memory_plan.describe())
    datasets = _datasets(data, opts)
    finetune_data.prepare(data, datasets[0].cached, emitter)
    return Setup(opts, resume, world, device, precision, data, model, model_config, datasets, sharding, plan,
                 pretrained, encoder, memory_plan)


def plan_memory(opts: FinetuneOptions, model, encoder: EncoderMode, num_classes: int,
                budget: memory.Budget) -> TrainingPlan:
    """Whether one step of --batch-size × --samples-per-volume crops of --roi fits ``budget``, with activation
    checkpointing if it must (training/plans.py); turns it on in ``model``. A frozen encoder trains nothing and
    keeps no optimiser state; a gradual one is planned for when all of it trains.

    Raises:
        BadInputError: it does not fit; the message says what would.
    """
    crops = opts.batch_size * opts.samples_per_volume
    voxels = math.prod(opts.roi)
    if opts.encoder == "frozen":
        encoder.apply(model, 0)

    @functools.cache
    def footprint(checkpointing: bool, n: int = crops):
        return step_footprint(model, (torch.zeros(n, 1, *opts.roi),), lambda out: out.float().log_softmax(1).mean(),
                              criterion_bytes=CRITERION_COPIES * n * num_classes * voxels * 4,
                              checkpointing=checkpointing)

    def would_fit(room: int) -> str:
        fits = int(room // footprint(True, 1).activations)  # one crop's share is largest alone: never optimistic
        if fits >= opts.samples_per_volume:
            change = f"--batch-size {fits // opts.samples_per_volume} would fit"
        elif fits >= 1:
            change = f"--samples-per-volume {fits} would fit"
        else:
            change = f"not even one crop of --roi {' '.join(map(str, opts.roi))} fits; try --roi 64" + (
                " or --preset small" if opts.preset == "base" else "")
        if opts.encoder != "frozen" and opts.pretrained and _frozen_footprint().total <= budget.bytes:
            change += "; or, keeping every other option, --encoder frozen fits (the pre-trained encoder stays fixed)"
        return change

    def _frozen_footprint():
        """The step with the encoder frozen (requires_grad and train flags restored afterwards)."""
        flags = [(p, p.requires_grad) for p in model.parameters()]
        modes = [(m, m.training) for m in model.modules()]
        try:
            EncoderMode.of("frozen", model, opts.arch, 1).apply(model, 0)
            return footprint.__wrapped__(True, crops)
        finally:
            for param, flag in flags:
                param.requires_grad_(flag)
            for module, training in modes:
                module.training = training

    chosen = choose_plan(footprint, budget, requested=None, can_checkpoint=True, would_fit=would_fit,
                         what=f"{opts.arch} {opts.preset} fine-tuning on {crops} crop(s) of "
                              f"{'×'.join(map(str, opts.roi))}")
    if chosen.activation_checkpointing:
        use_activation_checkpointing(model)
    return chosen


def _build_model(opts: FinetuneOptions, table):
    config = resolve_config(opts.arch, opts.preset, **opts.override)
    torch.manual_seed(derive_seed(opts.seed, "init"))  # the same initial weights in every process
    model = build_segmenter(opts.arch, table.num_classes, opts.preset, opts.roi, 1, **opts.override)
    return model, config


def _load_pretrained(model, opts: FinetuneOptions, table) -> dict | None:
    """Load --pretrained into the model; what was loaded, for config.json and the package's provenance."""
    if not opts.pretrained:
        log.info("no --pretrained: training from scratch")
        return None
    if is_package(opts.pretrained):
        loaded = load_package_start(model, opts.pretrained, opts.arch, 1, table)
        log.info("--pretrained %s", loaded["summary"])
        return loaded
    checkpoint = Path(opts.pretrained)
    if checkpoint.is_dir():
        try:
            checkpoint = pretrained_checkpoint(checkpoint, opts.arch)
        except BadInputError as e:
            raise BadInputError(f"--pretrained {e}") from e
    report = load_pretrained(model, checkpoint)  # refuses non-checkpoints, and encoders of the other architecture
    log.info("--pretrained %s", report.summary())
    return {"from": opts.pretrained, "checkpoint": str(checkpoint), "source": report.source,
            "method": report.method, "loaded": len(report.loaded), "ignored": len(report.ignored),
            "missing": len(report.missing), "adapted": report.adapted, "summary": report.summary()}


def _datasets(data: finetune_data.FinetuneData, opts: FinetuneOptions):
    from ..data.transforms import FinetunePreprocessing, finetune_train_dataset, finetune_val_dataset

    settings = FinetunePreprocessing(spacing_mm=opts.spacing, hu_window=opts.intensity, roi=opts.roi,
                                     num_samples=opts.samples_per_volume, class_ratios=class_ratios(data, opts))
    cache = Path(opts.cache)
    return (finetune_train_dataset(data.train, settings, cache, seed=opts.seed),
            finetune_val_dataset(data.val, settings, cache))


def class_ratios(data: finetune_data.FinetuneData, opts: FinetuneOptions) -> tuple[float, ...]:
    """`--crops classes`: weight 1 for the background and each value of the label table, 0 for unused values; the
    recipe's pos/neg crops otherwise (an empty tuple)."""
    if opts.crops != "classes":
        return ()
    values = {label.value for label in data.table.labels}
    return tuple(float(v == 0 or v in values) for v in range(max(values) + 1))


class ClippedAdamW(torch.optim.AdamW):
    """AdamW that first clips the gradients' global norm to `max_norm` (0: no clipping; §9.5 clips to 5).

    The engine's step has no clipping hook. Under a GradScaler this is still the true norm: `scaler.step` unscales
    the gradients (and skips the step on an overflow) before it calls `step`.
    """

    def __init__(self, params, *, max_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm = max_norm

    def step(self, closure=None):
        if self.max_norm > 0:
            grads = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, self.max_norm)
        return super().step(closure)


# ---- the run --------------------------------------------------------------------------------------------------------

def train(s: Setup, emitter: Emitter) -> None:
    """Write the run folder and train; a stop request ends it "stopped" (no exception), anything else "failed"."""
    config = read_json(s.run_dir.config) if s.resume else _config_json(s)
    writer = FinetuneRunWriter(s.run_dir, active=s.world.is_main, emitter=emitter, command="finetune",
                               epochs=s.opts.epochs, steps_per_epoch=s.plan["steps_per_epoch"],
                               total_steps=s.plan["total_steps"], log_every=s.opts.log_every)
    # No runtime.keep_freed_memory here, unlike pre-training: with it, fragmentation made one small 4-crop step's
    # resident memory grow 4.6 GB instead of 3.2 (more than the plan's estimate), at the same speed.
    with run_lifecycle(writer, None if s.resume else config) as stop:
        trainer = _trainer(s, writer, stop)
        if s.resume:
            engine.restore(trainer, read_checkpoint(s.run_dir.checkpoint("last"))[1])
            writer.set_best(best_record(s.run_dir))
        writer.open(trainer.step, preamble=_preamble(s, trainer.step))
        writer.set_state("starting", f"step {trainer.step} of {s.plan['total_steps']}")
        batches = functools.partial(distributed.epoch_batches, s.datasets[0], s.sharding, s.opts.workers, s.device,
                                    collate_fn=list_data_collate, items="cases")
        meta = {"method": s.opts.arch, "config": config_to_dict(s.model_config), "run": s.opts.to_dict(),
                "num_classes": s.data.table.num_classes}
        state = _fit_and_validate(trainer, batches, s.plan, s.opts, meta,
                                  functools.partial(_validate, trainer, s.datasets[1], s.data, s.opts, config))
        distributed.barrier(s.world)
        if state == "finished" and s.world.is_main and writer.best is not None:
            export_package(s.run_dir, config, writer.best, trainer.step)  # the final provenance, from best.pt
    package = s.run_dir.path / PACKAGE_DIR
    best = writer.best or {}
    finish(writer, trainer, state, s.plan, emitter, best_mean_dice=writer.status["best_mean_dice"],
           best_dice=writer.status["best_dice"], best_step=best.get("step"),
           model_package=str(package) if package.is_dir() else None)


def _trainer(s: Setup, writer: FinetuneRunWriter, stop) -> engine.Trainer:
    s.encoder.apply(s.model, 0)  # before DDP sees which parameters train; re-applied before every step
    model = distributed.wrap_model(s.model.to(s.device), s.world, s.device)
    optimizer = ClippedAdamW(s.encoder.param_groups(s.model, s.opts.weight_decay), lr=s.plan["lr"],
                             betas=tuple(s.plan["betas"]), max_norm=s.opts.clip_grad)
    schedule = functools.partial(engine.lr_at, lr=s.plan["lr"], min_lr=s.opts.min_lr,
                                 warmup_steps=s.plan["warmup_steps"], total_steps=s.plan["scheduled_steps"])
    criterion = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
    loss_fn = functools.partial(_loss, seed=s.opts.seed, device=s.device, criterion=criterion)
    return engine.Trainer(model, optimizer, loss_fn, schedule, s.device, s.precision, s.opts.accum, s.world, stop,
                          writer, s.plan["total_steps"], s.sharding.global_batch,
                          before_step=functools.partial(s.encoder.apply, s.model))


def _fit_and_validate(t: engine.Trainer, batches, plan: dict, opts: FinetuneOptions, meta: dict, validate) -> str:
    """engine.fit in stretches that end where a validation is due (every --val-every epochs), validating after each,
    and once more at the end of a finished run unless its last step was just validated."""
    spe, total, every = plan["steps_per_epoch"], plan["total_steps"], opts.val_every
    state, validated_at = "finished", None
    while t.step < total and not t.stopped:
        due = (t.step // spe // every + 1) * every * spe  # the step that completes the next validation epoch
        t.total_steps = min(total, due)
        state = engine.fit(t, batches, steps_per_epoch=spe, epochs=opts.epochs,
                           checkpoint_every=opts.checkpoint_every, checkpoint_meta=meta)
        if t.step == due:  # also when a stop came at the epoch's last step: the resumed run starts after it
            validate()
            validated_at = t.step
    t.total_steps = total
    if state == "finished" and validated_at != t.step:
        validate()
    return state


def _validate(t: engine.Trainer, dataset, data, opts: FinetuneOptions, config: dict) -> None:
    """Validate on every process's share of the cases, merge, and on a better mean Dice write best.pt and the package
    (rank 0). A score that is NaN (nothing to score) counts as the worst."""
    writer, world = t.writer, t.world
    mine = list(range(world.rank, len(dataset), world.size))

    def progress(i: int, name: str) -> None:
        writer.emitter.progress("validation", i / len(mine), f"validating {name} ({i + 1}/{len(mine)})")

    per_case = validate_cases(unwrap(t.model), dataset, mine, data.table, opts.roi, t.device, t.precision,
                              progress)
    merged = {k: v for part in distributed.gather_objects(per_case, world) for k, v in part.items()}
    result = summarize({c.name: merged[c.name] for c in data.val}, data.table)
    better = writer.best is None or _score(result.mean_dice) > _score(writer.best["mean_dice"])
    if better:
        writer.set_best({"step": t.step, "epoch": t.step / writer.steps_per_epoch, "mean_dice": result.mean_dice,
                         "dice": result.dice})
    if better and writer.active:
        save_checkpoint(writer.run.checkpoint("best"), model_state=unwrap(t.model).state_dict(),
                        method=opts.arch, config=config["model"]["config"], step=t.step, validation=writer.best)
        export_package(writer.run, config, writer.best, t.step, unwrap(t.model))
    writer.validation(t.step, result, better)


def _score(mean_dice: float) -> float:
    return -math.inf if mean_dice is None or math.isnan(mean_dice) else mean_dice


def _loss(model, batch, epoch: int, *, seed: int, device: torch.device, criterion) -> dict:
    """DiceCE of one micro-batch of crops. Stochastic depth draws from the global generator, so it is seeded from
    (seed, epoch, the micro-batch's positions in the epoch): a resumed run draws what the uninterrupted one did."""
    crops, positions = batch
    torch.manual_seed(derive_seed(seed, "drop-path", epoch, *positions))
    logits = model(crops["image"].to(device, non_blocking=True))  # (B·samples, num_classes, *roi)
    return {"loss": criterion(logits.float(), crops["label"].to(device, non_blocking=True))}


def _config_json(s: Setup) -> dict:
    import mim3d

    return {"command": "finetune", "created": now_iso(),
            "versions": {"mim3d": mim3d.__version__, "torch": torch.__version__, "python": sys.version.split()[0]},
            "options": s.opts.to_dict(),
            "model": {"arch": s.opts.arch, "preset": s.opts.preset, "config": config_to_dict(s.model_config),
                      "num_classes": s.data.table.num_classes, "in_channels": 1, "roi_size": list(s.opts.roi)},
            "preprocessing": package_preprocessing(s.opts), "inference": package_inference(s.opts, s.data.table),
            "data": s.data.to_config(), "pretrained": s.pretrained,
            "encoder": s.encoder.describe(s.model),
            "optimization": s.plan, "plan": s.memory_plan.to_config(),
            "runtime": {"device": s.device.type, "precision": s.precision, "world_size": s.world.size}}


def _preamble(s: Setup, step: int) -> str:
    """What log.txt starts each process's section with."""
    action = f"resuming at step {step}" if s.resume else "new run"
    start = f"pre-trained: {s.pretrained['summary']}" if s.pretrained else ("from scratch" if not s.resume else "")
    return (f"==== mim3d finetune {s.opts.arch} ({s.opts.preset}): {action}, {now_iso()}\n{s.data.describe()}\n"
            f"{start}\n{s.encoder.summary(s.model)}\n{s.plan['lr_note']}\n{s.memory_plan.describe()}\n"
            f"precision {s.precision}, {s.plan['steps_per_epoch']} steps per epoch, "
            f"{s.plan['total_steps']} steps to run in all\n")


def optimisation_plan(opts: FinetuneOptions, sharding: Sharding) -> dict:
    """Effective batch, learning rate and step counts (config.json "optimization").

    The learning rate is --lr as given (the BTCV recipe's batch scaling factor is 1 at its batch, §9.5).

    Raises:
        BadInputError: fewer training cases than one optimiser step needs.
    """
    spe, batch = sharding.steps_per_epoch, sharding.global_batch
    if spe < 1:
        raise BadInputError(f"{sharding.num_items} training cases, but one optimiser step takes batch "
                            f"{opts.batch_size} × accum {opts.accum} × {sharding.world.size} process(es) = "
                            f"{batch} cases; lower --batch-size or --accum, or add cases")
    crops = batch * opts.samples_per_volume
    scheduled = opts.epochs * spe
    return {"effective_batch": batch, "crops_per_step": crops, "batch_size": opts.batch_size,
            "accum": opts.accum, "world_size": sharding.world.size, "lr": opts.lr,
            "lr_note": (f"lr {opts.lr:.4g} (--lr as given); effective batch {batch} case(s) × "
                        f"{opts.samples_per_volume} crops = {crops} crops per step (batch {opts.batch_size} × "
                        f"accum {opts.accum} × {sharding.world.size} process(es))"),
            "min_lr": opts.min_lr, "weight_decay": opts.weight_decay, "betas": [0.9, 0.999],
            "clip_grad": opts.clip_grad, "epochs": opts.epochs, "warmup_epochs": opts.warmup_epochs,
            "warmup_steps": opts.warmup_epochs * spe, "steps_per_epoch": spe, "scheduled_steps": scheduled,
            "total_steps": min(scheduled, opts.max_steps or scheduled),
            "cases_unused_per_epoch": sharding.num_items - spe * batch}
