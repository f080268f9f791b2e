"""What a fine-tuning run adds to a run folder: validation records, the best checkpoint's record, and the model package.

- metrics.jsonl: {"kind": "validation", "step": int, "epoch": float (epochs done), "dice": {label name: float | null},
  "mean_dice": float | null, "best": bool, "time": ISO time}; null where a Dice is NaN (nothing to score).
- TensorBoard: "validation/mean_dice" and "validation/dice_<label>".
- status.json: besides the fields of every run, "best_mean_dice", "best_dice" ({label: Dice}), "best_epoch",
  "best_step" and "best_checkpoint" ("checkpoints/best.pt"), null until the first validation.
- checkpoints/best.pt: the model at the best mean Dice, with that validation's record under "validation".
- model/: the model package (mim3d.package) exported from those weights.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from ..errors import BadInputError
from ..labels import LabelTable
from ..models import build_segmenter
from ..models.checkpoints import read_checkpoint
from ..package import ModelInfo, save_package
from ..run_options import FinetuneOptions
from ..runs import RunDir, now_iso
from .run_writer import RunWriter
from .validation import BLEND, OVERLAP, ValidationResult

log = logging.getLogger("mim3d.training")
PACKAGE_DIR = "model"


def finite(value: float | None) -> float | None:
    """JSON has no NaN: a Dice with nothing to score is written as null."""
    return None if value is None or math.isnan(value) else value


class FinetuneRunWriter(RunWriter):
    """RunWriter plus validation records and the best score (module docstring); `best` is set on every rank."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.best: dict | None = None  # {"step", "epoch", "mean_dice", "dice"} of the best validation so far
        self.status.update(best_mean_dice=None, best_dice=None, best_epoch=None, best_step=None, best_checkpoint=None)

    def set_best(self, record: dict | None) -> None:
        self.best = record
        if record is not None:
            self.status.update(best_mean_dice=finite(record["mean_dice"]),
                               best_dice={k: finite(v) for k, v in record["dice"].items()},
                               best_epoch=round(record["epoch"], 4), best_step=record["step"],
                               best_checkpoint="checkpoints/best.pt")

    def validation(self, step: int, result: ValidationResult, best: bool) -> None:
        if not self.active:
            return
        epoch = round(step / self.steps_per_epoch, 4)
        dice = {name: finite(value) for name, value in result.dice.items()}
        self._append_metrics({"kind": "validation", "step": step, "epoch": epoch, "dice": dice,
                              "mean_dice": finite(result.mean_dice), "best": best, "time": now_iso()})
        scalars = {"mean_dice": finite(result.mean_dice), **{f"dice_{name}": v for name, v in dice.items()}}
        for name, value in scalars.items():
            if value is not None:
                self._tensorboard.add_scalar(f"validation/{name}", value, step)
        self._tensorboard.flush()
        self.emitter.metric(step, (step - 1) // self.steps_per_epoch,
                            {("mean_dice" if k == "mean_dice" else f"dice/{k[5:]}"): v for k, v in scalars.items()
                             if v is not None})
        self._write_status()
        log.info("validation at step %d (epoch %g): %s%s", step, epoch, result.summary(),
                 " - best so far, saved checkpoints/best.pt and model/" if best else "")


def best_record(run: RunDir) -> dict | None:
    """The validation record of checkpoints/best.pt, or None when the run has not validated yet."""
    path = run.checkpoint("best")
    return read_checkpoint(path)[1]["validation"] if path.exists() else None


# ---- the model package ----------------------------------------------------------------------------------------------

def package_preprocessing(opts: FinetuneOptions) -> dict:
    """model.json "preprocessing": what `mim3d segment` must do to a scan before the network sees it (§9.5)."""
    return {"orientation": "RAS", "spacing_mm": list(opts.spacing), "intensity_window_hu": list(opts.intensity),
            "foreground_crop": True}


def package_inference(opts: FinetuneOptions, table: LabelTable) -> dict:
    """model.json "inference": the sliding windows of validation, and the labels `mim3d segment` cleans by default
    (--keep-largest, checked against the label table)."""
    unknown = [name for name in opts.keep_largest or () if table.by_name(name) is None]
    if unknown:
        raise BadInputError(f"--keep-largest: {', '.join(unknown)} not in the label table ({table.describe()})")
    return {**_windows(opts.roi), **({"keep_largest": list(opts.keep_largest)} if opts.keep_largest else {})}


def _windows(roi) -> dict:
    """The sliding windows `mim3d segment` runs, as validation does."""
    return {"roi_size": list(roi), "overlap": OVERLAP, "blend": BLEND}


def export_package(run: RunDir, config: dict, best: dict, step: int, model: nn.Module | None = None) -> Path:
    """Write RUN_DIR/model (atomically) from `model`, the weights that scored `best`, or without one from best.pt.

    `step` is the run's step now (at a new best the same as best["step"]; later at the end of the run).
    """
    arch = config["model"]
    if model is None:
        model = build_segmenter(arch["arch"], arch["num_classes"], arch["preset"], tuple(arch["roi_size"]),
                                arch["in_channels"], **arch["config"])
        model.load_state_dict(read_checkpoint(run.checkpoint("best"))[1]["model"], strict=True)
    data, pretrained = config["data"], config["pretrained"]
    description = (f"{arch['arch']} ({arch['preset']}) fine-tuned by mim3d finetune on {len(data['train'])} cases "
                   f"from {data['source']}" + (f", from the {_start_kind(pretrained)} {pretrained['from']}"
                                               if pretrained else ", from scratch"))
    info = ModelInfo(
        name=run.path.name, version="1.0.0", description=description, license="",
        architecture={k: arch[k] for k in ("arch", "preset", "config", "num_classes", "in_channels")},
        preprocessing=config["preprocessing"],
        inference=config.get("inference") or _windows(arch["roi_size"]),  # runs from before --keep-largest
        labels=LabelTable.from_dict({"labels": data["labels"]}, source=str(run.config)), weights_sha256="",
        provenance=_provenance(config, best, step))
    with torch.no_grad():
        save_package(run.path / PACKAGE_DIR, model, info)
    return run.path / PACKAGE_DIR


def _start_kind(pretrained: dict) -> str:
    return "model package" if pretrained.get("source") == "mim3d-package" else "encoder"


def _provenance(config: dict, best: dict, step: int) -> dict:
    import mim3d

    data, pretrained, plan = config["data"], config["pretrained"], config["optimization"]
    return {"pretrained_from": pretrained["from"] if pretrained else None,
            "pretrained_checkpoint": pretrained["checkpoint"] if pretrained else None,
            "pretrained_method": pretrained["method"] if pretrained else None,
            "encoder": config.get("encoder") or {"mode": "full"},  # runs from before the modes trained it all
            "trained_on": {"source": data["source"], "count": len(data["train"]), "cases": data["train"]},
            "validated_on": {"count": len(data["val"]), "cases": data["val"], "split": data["split"]},
            "validation_dice": {k: finite(v) for k, v in best["dice"].items()},
            "validation_mean_dice": finite(best["mean_dice"]),
            "validation_space": "model space (resampled, windowed, foreground-cropped), sliding windows",
            "best_step": best["step"], "best_epoch": round(best["epoch"], 4),
            "epochs_trained": round(step / plan["steps_per_epoch"], 4), "steps_trained": step,
            "epochs_scheduled": plan["epochs"], "run_dir": config["options"]["out"],
            "mim3d_version": mim3d.__version__, "created": now_iso()}
