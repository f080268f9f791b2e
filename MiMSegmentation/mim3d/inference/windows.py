"""Sliding-window prediction in model space: MONAI ``sliding_window_inference`` with Gaussian blending, argmax to
uint8 per slab, mixed precision where the hardware has it (``amp_dtype``), flips for test-time augmentation, a
smaller window batch and then the CPU after a GPU out-of-memory error, and a cancel check before every window batch.
A window holding nothing but zeros (air below the intensity window, or padding) always gets the same answer, so all
such windows share one forward pass: exact, and free.

Memory: the blended logits (float32, one channel per class) exist only for one slab of the model-space volume at a
time; a slab is as deep along K as ``LOGITS_BUDGET_BYTES`` allows (the whole volume for the usual few-class models),
plus a halo of half a window on each side so that every kept voxel is predicted with full window context. What
leaves this module is the uint8 label map.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference

from ..devices import cpu_computes_bf16
from ..errors import Cancelled

log = logging.getLogger(__name__)
LOGITS_BUDGET_BYTES = 1 << 30  # blended logits of one slab (x2 with TTA); CPU RAM or GPU memory
TTA_FLIPS = ((), (2,), (3,), (4,))  # identity and one flip per axis of (B, C, I, J, K): 4 passes, logits summed
CUDA_BATCH_SIZES = ((40e9, 8), (20e9, 4), (10e9, 2))  # free GPU bytes -> windows per forward pass; else 1


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for inference on ``device``, None for float32.

    CUDA: bf16 where the GPU has it, else fp16. CPU: bf16 where the CPU computes it natively (AMX or AVX512-BF16
    units, e.g. Xeon Sapphire Rapids and later, Zen 4 and later), where oneDNN's bf16 3-D convolutions run a
    mim-unetr window 1.8-2.2× as fast as float32 (docs/BENCHMARKS.md); float32 on every other CPU, where bf16
    would be emulated and slower.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_computes_bf16():
        return torch.bfloat16
    return None


@dataclass(frozen=True)
class Plan:
    """Where the network runs (``device``), how many windows per pass, where the blended logits accumulate, and
    whether it runs in mixed precision where the device has a fast lower precision (``amp``, see ``amp_dtype``)."""

    device: torch.device
    sw_batch_size: int
    output_device: torch.device
    amp: bool = True

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype of the forward passes; None: float32."""
        return amp_dtype(self.device) if self.amp else None

    def describe(self) -> str:
        where = self.device.type if self.output_device == self.device else f"{self.device.type}, output on cpu"
        precision = str(self.dtype).removeprefix("torch.") if self.dtype else "float32"
        return f"{where}, {self.sw_batch_size} window(s) per pass, {precision}"


def initial_plan(device: torch.device, sw_batch_size: int | None = None, amp: bool = True) -> Plan:
    """Start plan: on CUDA the window batch follows the free GPU memory (``CUDA_BATCH_SIZES``), on CPU 1 (a larger
    batch gives a CPU no speed, only memory); ``amp`` as in ``Plan``."""
    if sw_batch_size is None:
        sw_batch_size = 1
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            sw_batch_size = next((n for need, n in CUDA_BATCH_SIZES if free >= need), 1)
    return Plan(device, int(sw_batch_size), device, amp)


def fallback(plan: Plan) -> Plan | None:
    """The next plan after an out-of-memory error: halve the window batch, then accumulate on the CPU, then run
    everything on the CPU; None when nothing is left to try."""
    cpu = torch.device("cpu")
    if plan.sw_batch_size > 1:
        return replace(plan, sw_batch_size=plan.sw_batch_size // 2)
    if plan.output_device.type == "cuda":
        return replace(plan, output_device=cpu)
    if plan.device.type == "cuda":
        return Plan(cpu, 1, cpu, plan.amp)
    return None


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
        plan: device and window batch to start with (``initial_plan``); out-of-memory errors walk ``fallback``.
        progress: called ("windows", fraction, "window n/N") after every forward pass.
        cancel: polled before every forward pass; True stops with ``Cancelled``.

    Returns:
        (labels (I, J, K) uint8 = argmax over the classes, the plan that finished, windows visited, how many of
        them were all zeros and answered from the shared pass).
    """
    flips = TTA_FLIPS if tta else ((),)
    depth_bytes = num_classes * volume.shape[0] * volume.shape[1] * 4 * (2 if tta else 1)
    parts = slabs(volume.shape[2], roi[2], int(LOGITS_BUDGET_BYTES // max(1, depth_bytes)))
    total = len(flips) * sum(count_windows((*volume.shape[:2], hi - lo), roi, overlap) for lo, hi, _, _ in parts)
    counter = _WindowCounter(total, progress, cancel)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    x = torch.from_numpy(np.ascontiguousarray(volume))[None, None]  # (1, 1, I, J, K)
    for lo, hi, keep_lo, keep_hi in parts:
        while True:
            start = (counter.done, counter.empty)
            try:
                logits = _blended_logits(x[..., lo:hi], model, roi, overlap, blend, plan, flips, counter)
                labels[..., keep_lo:keep_hi] = _argmax_uint8(logits[..., keep_lo - lo: keep_hi - lo])
                break
            except torch.cuda.OutOfMemoryError as e:
                nxt = fallback(plan)
                if nxt is None:
                    raise
                message = f"GPU out of memory ({plan.describe()}); retrying with {nxt.describe()}"
                log.warning("%s: %s", message, str(e).splitlines()[0] if str(e) else "")
                counter.retry(start, message)
                model.to(nxt.device)
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

