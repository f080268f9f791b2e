"""Validation during fine-tuning (METHOD.md §9.6): sliding-window inference on each whole validation case, argmax,
and the Dice of every label of the table.

- Space: the model's (RAS, resampled, windowed, foreground-cropped, padded to the ROI), as the official evaluation;
  nothing is mapped back to the original grid.
- Windows: the machinery of `mim3d segment` (`inference.windows.predict_labels`): MONAI `sliding_window_inference`
  with the model's ROI, overlap 0.5 and Gaussian blending, the inference settings the exported model package carries
  (the official evaluation blends with constant weights), streamed in slabs with a window batch and an output device
  planned from the memory the training leaves free (`inference.plans.choose_plan`), stepping down on out-of-memory
  errors; only the uint8 labels of a case are kept.
- Dice of a label in a case: MONAI `DiceMetric` without background. A label absent from both the prediction and the
  reference has nothing to score and is NaN; one predicted where the reference has none scores 0.
- Dice of a label: the mean over the cases where it is not NaN. Mean Dice: the mean over the labels that have a value
  (NaN when none has). The official code averages each case's class mean over the cases instead; both agree when every
  case holds every label.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from monai.metrics import DiceMetric
from torch import Tensor, nn

from ..inference import plans, windows
from ..labels import LabelTable

log = logging.getLogger("mim3d.training")
OVERLAP = 0.5  # §9.6, yaml default
BLEND = "gaussian"


@dataclass(frozen=True)
class ValidationResult:
    dice: dict[str, float]  # label name -> mean Dice over the cases (NaN: no case holds or predicts it)
    mean_dice: float  # over the labels with a value; NaN when none has one
    per_case: dict[str, dict[str, float]]  # case name -> label name -> Dice

    def summary(self) -> str:
        return f"mean Dice {self.mean_dice:.4f} (" + ", ".join(f"{n} {v:.4f}" for n, v in self.dice.items()) + ")"


def case_dice(prediction: Tensor, reference: Tensor, table: LabelTable) -> dict[str, float]:
    """Dice of each table label, in table order.

    Args:
        prediction, reference: (1, 1, I, J, K) integer label maps on the same grid (values = table values).
    """
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False,
                        num_classes=table.num_classes)
    scores = metric(prediction, reference)[0]  # (num_classes - 1,): entry v - 1 is the Dice of value v
    out = {}
    for label in table:
        scored = bool((prediction == label.value).any() or (reference == label.value).any())
        out[label.name] = float(scores[label.value - 1]) if scored else math.nan
    return out


def nanmean(values) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


@torch.no_grad()
def validate_cases(model: nn.Module, dataset, indices: list[int], table: LabelTable, roi: tuple[int, int, int],
                   device: torch.device, precision: str,
                   progress: Callable[[int, str], None] | None = None) -> dict[str, dict[str, float]]:
    """Segment the cases `indices` of `dataset` (items {"image": (1, I, J, K), "label": (1, I, J, K), "name"}) and
    score them: case name -> label name -> Dice.

    The model is put in eval mode and back, and stays on ``device``; the global random generators are left as they
    were, so validating does not change the training that follows. ``precision`` "fp32" runs float32, "bf16" or
    "fp16" the device's native lower precision (the training's).
    """
    was_training = model.training
    model.eval()
    per_case = {}
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for i, index in enumerate(indices):
                item = dataset[index]
                if progress:
                    progress(i, item["name"])
                volume = item["image"].as_tensor()[0].numpy()  # (I, J, K) in [0, 1]
                footprint = plans.Footprint.of(model, volume.shape, roi, table.num_classes, False)
                plan, statement = plans.choose_plan(device, footprint, amp=precision != "fp32")
                log.info("validating %s: %s", item["name"], statement)
                labels, _, _, _ = windows.predict_labels(volume, model, roi=roi, overlap=OVERLAP, blend=BLEND,
                                                         num_classes=table.num_classes, plan=plan)
                prediction = torch.from_numpy(labels).long()[None, None]  # (1, 1, I, J, K)
                per_case[item["name"]] = case_dice(prediction, item["label"].as_tensor()[None], table)
    finally:
        model.to(device)  # back where training runs, should an out-of-memory error have moved it to the CPU
        model.train(was_training)
    return per_case


def summarize(per_case: dict[str, dict[str, float]], table: LabelTable) -> ValidationResult:
    """The Dice of each label over the cases, and the mean Dice (module docstring)."""
    dice = {label.name: nanmean(case[label.name] for case in per_case.values()) for label in table}
    return ValidationResult(dice, nanmean(dice.values()), per_case)
