"""Sliding-window prediction in model space: MONAI ``sliding_window_inference`` with Gaussian blending, argmax to
uint8 per slab, mixed precision where the hardware has it (``plans.amp_dtype``), flips for test-time augmentation,
the next plan of ``plans.fallback`` after an out-of-memory error of any form (``plans.is_out_of_memory``; moving the
model to the device included), and a cancel check before every window batch.
A window holding nothing but zeros (air below the intensity window, or padding) always gets the same answer, so all
such windows share one forward pass: exact, and free.

Memory: the blended logits (float32, one channel per class) exist only for one slab of the model-space volume at a
time; a slab is as deep along K as ``LOGITS_BUDGET_BYTES`` and the plan's memory allow (the whole volume for the
usual few-class models), plus a halo of half a window on each side so that every kept voxel is predicted with full
window context. What leaves this module is the uint8 label map.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import numpy as np
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference

from ..errors import Cancelled
from .plans import Plan, fallback, is_out_of_memory, reduction

log = logging.getLogger(__name__)
LOGITS_BUDGET_BYTES = 1 << 30  # blended logits of one slab (x2 with TTA); CPU RAM or GPU memory
TTA_FLIPS = ((), (2,), (3,), (4,))  # identity and one flip per axis of (B, C, I, J, K): 4 passes, logits summed


def count_windows(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    """Windows MONAI's ``sliding_window_inference`` visits on a volume of ``shape`` (after its padding to ``roi``)."""
    size = tuple(max(n, r) for n, r in zip(shape, roi, strict=True))
    interval = tuple(r if r == n else max(1, int(r * (1 - overlap))) for n, r in zip(size, roi, strict=True))
    return len(dense_patch_slices(size, roi, interval))


def slabs(depth: int, roi_depth: int, core: int) -> list[tuple[int, int, int, int]]:
    """Cover K = 0..depth with slabs (lo, hi, keep_lo, keep_hi): predict [lo, hi), keep [keep_lo, keep_hi); kept parts
    tile the volume, each with a halo of half a window unless it touches the volume's end."""
    halo = roi_depth // 2
    core = max(core, roi_depth)
    if depth <= core + 2 * halo:
        return [(0, depth, 0, depth)]
    result, start = [], 0
    while start < depth:
        stop = min(depth, start + core)
        result.append((max(0, start - halo), min(depth, stop + halo), start, stop))
        start = stop
    return result


def predict_labels(volume: np.ndarray, model: torch.nn.Module, *, roi: tuple[int, int, int], overlap: float,
                   blend: str, num_classes: int, plan: Plan, tta: bool = False,
                   progress: Callable[[str, float, str], None] | None = None,
                   cancel: Callable[[], bool] | None = None) -> tuple[np.ndarray, Plan, int, int]:
    """Labels of a model-space volume.

    Args:
        volume: (I, J, K) float32 in [0, 1] (windowed intensities), RAS-oriented, at the model's spacing.
        roi, overlap, blend: window size (I, J, K), overlap fraction in [0, 1), "gaussian" or "constant".
        plan: device, window batch and slab depth to start with (``plans.choose_plan``); the model is moved to its
            device here, and out-of-memory errors (in that move too) walk ``plans.fallback``.
        progress: called ("windows", fraction, "window n/N") after every forward pass.
        cancel: polled before every forward pass; True stops with ``Cancelled``.

    Returns:
        (labels (I, J, K) uint8 = argmax over the classes, the plan that finished, windows visited, how many of
        them were all zeros and answered from the shared pass).
    """
    flips = TTA_FLIPS if tta else ((),)
    depth_bytes = num_classes * volume.shape[0] * volume.shape[1] * 4 * (2 if tta else 1)
    core = int(LOGITS_BUDGET_BYTES // max(1, depth_bytes))
    if plan.slab_planes is not None:  # the plan's memory holds the halo of half a window on each side too
        core = min(core, plan.slab_planes - roi[2])
    parts = slabs(volume.shape[2], roi[2], core)
    total = len(flips) * sum(count_windows((*volume.shape[:2], hi - lo), roi, overlap) for lo, hi, _, _ in parts)
    counter = _WindowCounter(total, progress, cancel)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    x = torch.from_numpy(np.ascontiguousarray(volume))[None, None]  # (1, 1, I, J, K)
    for lo, hi, keep_lo, keep_hi in parts:
        while True:
            start = (counter.done, counter.empty)
            try:
                model.to(plan.device)
                logits = _blended_logits(x[..., lo:hi], model, roi, overlap, blend, plan, flips, counter)
                labels[..., keep_lo:keep_hi] = _argmax_uint8(logits[..., keep_lo - lo: keep_hi - lo])
                break
            except (RuntimeError, MemoryError) as e:
                nxt = fallback(plan) if is_out_of_memory(e) else None
                if nxt is None:
                    raise
                message = (f"{plan.device.type.upper()} out of memory ({plan.describe()}); retrying with "
                           f"{nxt.describe()}: {reduction(plan, nxt)}")
                log.warning("%s: %s", message, str(e).splitlines()[0] if str(e) else "")
                counter.retry(start, message)
                plan = nxt
            if torch.cuda.is_available():  # after a failed attempt, once its traceback (and tensors) are gone
                torch.cuda.empty_cache()
        del logits
    return labels, plan, counter.done, counter.empty


class _WindowCounter:
    """Counts windows for progress and polls cancel before each forward pass."""

    def __init__(self, total: int, progress, cancel):
        self.total, self.done, self.progress, self.cancel = max(total, 1), 0, progress, cancel
        self.empty, self.empty_output = 0, None  # all-zero windows answered from one cached forward pass

    def before(self) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled(f"stopped after {self.done} of {self.total} windows")

    def after(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress("windows", min(1.0, self.done / self.total), f"window {self.done}/{self.total}")

    def retry(self, start: tuple[int, int], message: str) -> None:
        """Count again from ``start`` (done, empty) after a failed attempt; the shared answer is recomputed."""
        (self.done, self.empty), self.empty_output = start, None
        if self.progress is not None:
            self.progress("windows", self.done / self.total, message)


def _blended_logits(x: torch.Tensor, model, roi, overlap, blend, plan: Plan, flips, counter) -> torch.Tensor:
    """Sum over ``flips`` of the blended logits of (1, 1, I, J, k) ``x``: (C, I, J, k) float32 on the output device."""

    def predictor(window: torch.Tensor) -> torch.Tensor:
        counter.before()
        if not window.any():  # nothing but air (and padding): the answer to an all-zero window is always the same
            if counter.empty_output is None or counter.empty_output.shape[2:] != window.shape[2:]:
                counter.empty_output = _forward(model, torch.zeros_like(window[:1]), plan)
            out = counter.empty_output.repeat(window.shape[0], 1, 1, 1, 1)  # a copy: MONAI weights it in place
            counter.empty += window.shape[0]
        else:
            out = _forward(model, window, plan)
        counter.after(window.shape[0])
        return out

    total = None
    with torch.inference_mode():
        for axes in flips:
            inputs = torch.flip(x, axes) if axes else x
            out = sliding_window_inference(inputs.to(plan.device), roi, plan.sw_batch_size, predictor,
                                           overlap=overlap, mode=blend, padding_mode="constant", cval=0.0,
                                           sw_device=plan.device, device=plan.output_device)
            out = (torch.flip(out, axes) if axes else out)[0]
            total = out if total is None else total.add_(out)
    return total


def _forward(model, window: torch.Tensor, plan: Plan) -> torch.Tensor:
    dtype = plan.dtype
    with torch.autocast(plan.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
        return model(window).float()


def _argmax_uint8(logits: torch.Tensor) -> np.ndarray:
    """(C, I, J, K) -> (I, J, K) uint8, computed where the logits are and moved to the CPU as bytes. (``torch.max``
    gives the same first-maximum indices as ``argmax``, about 10× faster over the leading dimension on a CPU.)"""
    return torch.max(logits, dim=0).indices.to(torch.uint8).cpu().numpy()

