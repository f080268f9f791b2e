"""Fine-tuning a segmentation network on labelled cases (MIM_METHOD §9, §14.2): a run folder (mim3d.runs) that ends
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

--pretrained takes an official MiM checkpoint, a mim3d checkpoint, or a `mim3d pretrain` run folder, whose
checkpoints/last.pt it loads: the run's final weights (pre-training has no validation score to choose a best by).
MiM encoders fine-tune as mim-unetr, MAE and SimMIM encoders as unetr (§14.2), with the --preset they were pre-trained
with. Before the run folder is written, every case is checked and pre-processed once (through the cache), and the
weights are loaded, so bad input ends with exit code 2 and leaves nothing behind. Stop with SIGTERM, Ctrl-C or
`touch RUN_DIR/STOP`: the step finishes, checkpoints/last.pt is saved and --resume continues the run exactly.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import shutil
import sys
from pathlib import Path

import torch
from monai.data import list_data_collate
from monai.losses import DiceCELoss

from ..errors import BadInputError
from ..models import build_segmenter, load_pretrained
from ..models.checkpoints import read_checkpoint, save_checkpoint
from ..presets import config_to_dict, resolve
from ..protocol import Emitter
from ..runs import RunDir, now_iso, read_json, write_json_atomic
from ..runtime import keep_freed_memory
from . import distributed, engine, finetune_data, finetune_options, options
from .distributed import Sharding, World, derive_seed, unwrap
from .finetune_writer import PACKAGE_DIR, FinetuneRunWriter, best_record, export_package, package_preprocessing
from .run_writer import StopController
from .validation import summarize, validate_cases

log = logging.getLogger("mim3d.training")
ENCODER_ARCH = {"mim": "mim-unetr", "mae": "unetr", "simmim": "unetr"}  # §9.4, §14.2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    finetune_options.add_arguments(parser)


def run(args: argparse.Namespace, emitter: Emitter) -> None:
    world = distributed.world_from_env()
    emitter = distributed.rank_zero_voice(world, emitter)
    opts, resume = finetune_options.resolve(args)
    device = distributed.select_device(opts["device"], world)
    data = finetune_data.load_data(opts)
    log.info("%s", data.describe())
    model, model_config = _build_model(opts, data.table)
    sharding = Sharding(len(data.train), opts["batch_size"], opts["accum"], world, opts["seed"])
    plan = finetune_options.optimisation_plan(opts, sharding)
    pretrained = None
    if resume is None:
        options.check_new_run_folder(Path(opts["out"]))
        pretrained = _load_pretrained(model, opts)
    else:
        finetune_data.check_resume_matches(read_json(resume.config), data, resume.path)
    precision, note = engine.choose_precision(device, opts["amp"])
    if note:
        log.warning(note)
    log.info("%s", plan["lr_note"])
    datasets = _datasets(data, opts)
    finetune_data.prepare(data, datasets[0].cached, emitter)
    distributed.init_process_group(world, device)  # every process has validated everything before anything is written
    try:
        _train(opts, resume, world, device, precision, model, model_config, data, datasets, sharding, plan,
               pretrained, emitter)
    finally:
        distributed.shutdown(world)


# ---- before anything is written -------------------------------------------------------------------------------------

def _build_model(opts: dict, table):
    config = resolve(opts["arch"], opts["preset"], **opts["override"])
    torch.manual_seed(derive_seed(opts["seed"], "init"))  # the same initial weights in every process
    model = build_segmenter(opts["arch"], table.num_classes, opts["preset"], tuple(opts["roi"]), 1, **opts["override"])
    return model, config


def pretrained_checkpoint(path: Path, arch: str) -> Path:
    """The checkpoint file --pretrained names: the file itself, or a pre-training run's checkpoints/last.pt.

    Raises:
        BadInputError: a folder that is not a pre-training run, a run without a checkpoint yet, or a run whose method
            needs the other architecture.
    """
    if not path.is_dir():
        return path
    run = RunDir(path)
    config = read_json(run.config)
    if config is None or config.get("command") != "pretrain":
        found = f"a {config['command']} run" if config and config.get("command") else "no mim3d run (no config.json)"
        raise BadInputError(f"--pretrained {path}: is a folder holding {found}; give a checkpoint file or the folder "
                            "of a `mim3d pretrain` run")
    method = config.get("model", {}).get("method")
    if ENCODER_ARCH.get(method, arch) != arch:
        raise BadInputError(f"--pretrained {path}: a {method} pre-training run; its encoder fine-tunes with --arch "
                            f"{ENCODER_ARCH[method]}, not --arch {arch}")
    if not run.checkpoint("last").exists():
        raise BadInputError(f"--pretrained {path}: the run has no checkpoints/last.pt yet (it has not finished an "
                            "epoch)")
    return run.checkpoint("last")


def _load_pretrained(model, opts: dict) -> dict | None:
    """Load --pretrained into the model; what was loaded, for config.json and the package's provenance."""
    if not opts["pretrained"]:
        log.info("no --pretrained: training from scratch")
        return None
    checkpoint = pretrained_checkpoint(Path(opts["pretrained"]), opts["arch"])
    report = load_pretrained(model, checkpoint)  # refuses non-checkpoints, and encoders of the other architecture
    log.info("--pretrained %s", report.summary())
    return {"from": opts["pretrained"], "checkpoint": str(checkpoint), "source": report.source,
            "method": report.method, "loaded": len(report.loaded), "ignored": len(report.ignored),
            "missing": len(report.missing), "adapted": report.adapted, "summary": report.summary()}


def _datasets(data: finetune_data.FinetuneData, opts: dict):
    from ..data.transforms import FinetunePreprocessing, finetune_train_dataset, finetune_val_dataset

    settings = FinetunePreprocessing(spacing_mm=tuple(opts["spacing"]), hu_window=tuple(opts["intensity"]),
                                     roi=tuple(opts["roi"]), num_samples=opts["samples_per_volume"])
    cache = Path(opts["cache"])
    return (finetune_train_dataset(data.train, settings, cache, seed=opts["seed"]),
            finetune_val_dataset(data.val, settings, cache))


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

def _train(opts, resume, world: World, device, precision, model, model_config, data, datasets, sharding, plan,
           pretrained, emitter: Emitter) -> None:
    run_dir = RunDir(resume.path if resume else opts["out"])
    created = resume is None
    config = read_json(run_dir.config) if resume else _config_json(opts, model_config, data, plan, pretrained,
                                                                       world, device, precision)
    if created and world.is_main:
        run_dir.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir.config, config)
    writer = FinetuneRunWriter(run_dir, active=world.is_main, emitter=emitter, command="finetune",
                               epochs=opts["epochs"], steps_per_epoch=plan["steps_per_epoch"],
                               total_steps=plan["total_steps"], log_every=opts["log_every"])
    stop = StopController(run_dir.stop_file if world.is_main else None)
    if device.type == "cpu":
        keep_freed_memory()  # steps reuse the same large buffers (mim3d.runtime)
    try:
        model.to(device)
        model = distributed.wrap_model(model, world, device)
        optimizer = ClippedAdamW(engine.param_groups(unwrap(model), opts["weight_decay"]), lr=plan["lr"],
                                 betas=tuple(plan["betas"]), max_norm=opts["clip_grad"])
        schedule = functools.partial(engine.lr_at, lr=plan["lr"], min_lr=opts["min_lr"],
                                     warmup_steps=plan["warmup_steps"], total_steps=plan["scheduled_steps"])
        criterion = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
        trainer = engine.Trainer(model, optimizer, functools.partial(_loss, seed=opts["seed"], device=device,
                                                                     criterion=criterion),
                                 schedule, device, precision, opts["accum"], world, stop, writer, plan["total_steps"],
                                 sharding.global_batch)
        if resume:
            engine.restore(trainer, read_checkpoint(run_dir.checkpoint("last"))[1])
            writer.set_best(best_record(run_dir))
        writer.open(trainer.step, preamble=_preamble(opts, data, plan, resume, trainer.step, precision, pretrained))
        writer.set_state("starting", f"step {trainer.step} of {plan['total_steps']}")
        batches = functools.partial(distributed.epoch_batches, datasets[0], sharding, opts["workers"], device,
                                    collate_fn=list_data_collate, items="cases")
        meta = {"method": opts["arch"], "config": config_to_dict(model_config), "run": opts,
                "num_classes": data.table.num_classes}
        state = _fit_and_validate(trainer, batches, plan, opts, meta,
                                  functools.partial(_validate, trainer, datasets[1], data, opts, config))
        distributed.barrier(world)
        if state == "finished" and world.is_main and writer.best is not None:
            export_package(run_dir, config, writer.best, trainer.step)  # the final provenance, from best.pt
    except BadInputError:
        writer.close()
        if created and world.is_main and not run_dir.checkpoint("last").exists():
            shutil.rmtree(run_dir.path, ignore_errors=True)  # bad input leaves no half-made run behind
        raise
    except BaseException as e:
        writer.set_state("failed", f"{type(e).__name__}: {e}")
        writer.close()
        raise
    finally:
        stop.close()
    _finish(writer, trainer, state, plan, emitter)


def _fit_and_validate(t: engine.Trainer, batches, plan: dict, opts: dict, meta: dict, validate) -> str:
    """engine.fit in stretches that end where a validation is due (every --val-every epochs), validating after each,
    and once more at the end of a finished run unless its last step was just validated."""
    spe, total, every = plan["steps_per_epoch"], plan["total_steps"], opts["val_every"]
    state, validated_at = "finished", None
    while t.step < total and not t.stopped:
        due = (t.step // spe // every + 1) * every * spe  # the step that completes the next validation epoch
        t.total_steps = min(total, due)
        state = engine.fit(t, batches, steps_per_epoch=spe, epochs=opts["epochs"],
                           checkpoint_every=opts["checkpoint_every"], checkpoint_meta=meta)
        if t.step == due:  # also when a stop came at the epoch's last step: the resumed run starts after it
            validate()
            validated_at = t.step
    t.total_steps = total
    if state == "finished" and validated_at != t.step:
        validate()
    return state


def _validate(t: engine.Trainer, dataset, data, opts: dict, config: dict) -> None:
    """Validate on every process's share of the cases, merge, and on a better mean Dice write best.pt and the package
    (rank 0). A score that is NaN (nothing to score) counts as the worst."""
    writer, world = t.writer, t.world
    mine = list(range(world.rank, len(dataset), world.size))

    def progress(i: int, name: str) -> None:
        writer.emitter.progress("validation", i / len(mine), f"validating {name} ({i + 1}/{len(mine)})")

    per_case = validate_cases(unwrap(t.model), dataset, mine, data.table, tuple(opts["roi"]), t.device, t.precision,
                              progress)
    merged = {k: v for part in distributed.gather_objects(per_case, world) for k, v in part.items()}
    result = summarize({c.name: merged[c.name] for c in data.val}, data.table)
    better = writer.best is None or _score(result.mean_dice) > _score(writer.best["mean_dice"])
    if better:
        writer.set_best({"step": t.step, "epoch": t.step / writer.steps_per_epoch, "mean_dice": result.mean_dice,
                         "dice": result.dice})
    if better and writer.active:
        save_checkpoint(writer.run.checkpoint("best"), model_state=unwrap(t.model).state_dict(),
                        method=opts["arch"], config=config["model"]["config"], step=t.step, validation=writer.best)
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


def _finish(writer: FinetuneRunWriter, trainer: engine.Trainer, state: str, plan: dict, emitter: Emitter) -> None:
    message = writer.end(state, trainer.step, trainer.stop.reason, plan)
    package = writer.run.path / PACKAGE_DIR
    best = writer.best or {}
    emitter.result(state=state, run_dir=str(writer.run.path), step=trainer.step, total_steps=plan["total_steps"],
                   epoch=writer.status["epoch"], loss=writer.status["loss"],
                   last_checkpoint=writer.status["last_checkpoint"], best_mean_dice=writer.status["best_mean_dice"],
                   best_dice=writer.status["best_dice"], best_step=best.get("step"),
                   model_package=str(package) if package.is_dir() else None, message=message)


def _config_json(opts, model_config, data, plan, pretrained, world: World, device, precision) -> dict:
    import mim3d

    return {"command": "finetune", "created": now_iso(),
            "versions": {"mim3d": mim3d.__version__, "torch": torch.__version__, "python": sys.version.split()[0]},
            "options": opts,
            "model": {"arch": opts["arch"], "preset": opts["preset"], "config": config_to_dict(model_config),
                      "num_classes": data.table.num_classes, "in_channels": 1, "roi_size": list(opts["roi"])},
            "preprocessing": package_preprocessing(opts), "data": data.to_config(), "pretrained": pretrained,
            "optimization": plan, "runtime": {"device": device.type, "precision": precision, "world_size": world.size}}


def _preamble(opts, data, plan, resume, step, precision, pretrained) -> str:
    """What log.txt starts each process's section with."""
    action = f"resuming at step {step}" if resume else "new run"
    start = f"pre-trained: {pretrained['summary']}" if pretrained else ("from scratch" if not resume else "")
    return (f"==== mim3d finetune {opts['arch']} ({opts['preset']}): {action}, {now_iso()}\n{data.describe()}\n"
            f"{start}\n{plan['lr_note']}\nprecision {precision}, {plan['steps_per_epoch']} steps per epoch, "
            f"{plan['total_steps']} steps to run in all\n")
