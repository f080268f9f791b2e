"""Segment one CT volume with a model package: the labels come back on exactly the input's grid.

    >>> model, info = load_package("models/abdomen-small")
    >>> labels = segment_volume(read_volume("ct.nii.gz"), model, info, device="cpu")   # uint8 sitk.Image

Steps (each reported through ``progress(stage, fraction, message)``):

1. preprocess: crop to the body box (``geometry.body_box``: voxels above -500 HU, slices with at least 0.1% of
   them, plus 10 mm; when ``model.json`` asks for ``foreground_crop``) intersected with the user's ROI; orient RAS
   and resample linearly to the model spacing (``geometry.model_grid``); window the HU to [0, 1] as in training. Air
   outside the box would be 0 after windowing, which is also the sliding window's padding value, so the crop saves
   the windows over air and moves the window tiling; the values the network sees are unchanged.
2. windows: a plan from the memory the job may use (``plans.choose_plan``: window batch, where the logits
   accumulate, slab depth; stated in the progress stream), then MONAI sliding-window inference with Gaussian
   blending (mixed precision where the device computes a lower precision natively, ``plans.amp_dtype``; the window
   batch halved, then the logits and then the network moved to the CPU on out-of-memory errors), all-air windows
   answered by one shared pass, argmax to uint8 in model space (``windows.predict_labels``).
3. postprocess: the label map onto the input grid, each label's indicator interpolated linearly so that boundaries
   run smoothly between model voxels instead of as blocks of them (``geometry.labels_to_input``),
   keep-largest-component per label, zeros outside the computed box.

Why argmax in model space, not resampling probabilities: the probabilities of every class at the input resolution
are what exhausts memory on large CTs (Slicer notes C4.3); the label map costs one byte a voxel, and one label's
interpolated indicator at a time a few more. Every geometric case (permuted, flipped, oblique) is handled by the one
physical-space resampling.

``fast=True`` runs the network at twice the model spacing along every axis (``FAST_SPACING_FACTOR``): 8× fewer voxels
and about 8× fewer windows, but the network sees anatomy at half the size it was trained on, so small structures and
boundaries suffer; use it for a first look on a CPU, not for measurements.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from .. import io, memory
from ..devices import use_fast_cuda_kernels
from ..errors import BadInputError, Cancelled
from ..package import ModelInfo
from . import geometry, plans, windows

log = logging.getLogger(__name__)
FAST_SPACING_FACTOR = 2.0
# An input whose values never reach air or never reach soft tissue is not CT in HU (MR, PET, a normalised export).
CT_MAX_BELOW, CT_MIN_ABOVE = 200.0, -200.0

Progress = Callable[[str, float, str], None]


@dataclass(frozen=True)
class InferenceSettings:
    """What ``model.json`` (and the user's options) say about pre-processing and windows, checked."""

    spacing_mm: tuple[float, float, float]
    window_hu: tuple[float, float]
    foreground_crop: bool
    roi_size: tuple[int, int, int]
    overlap: float
    blend: str
    num_classes: int
    keep_largest: tuple[str, ...]  # label names cleaned by default (model.json inference.keep_largest)

    @classmethod
    def from_info(cls, info: ModelInfo, fast: bool = False, overlap: float | None = None) -> InferenceSettings:
        where = f"model '{info.name}' (model.json)"
        pre, inf = info.preprocessing, info.inference
        orientation = pre.get("orientation", "RAS")
        if orientation != "RAS":
            raise BadInputError(f"{where}: preprocessing.orientation '{orientation}' is not supported; mim3d models "
                                "are trained on RAS-oriented volumes (\"RAS\").")
        spacing = pre.get("spacing_mm")
        if not (isinstance(spacing, list | tuple) and len(spacing) == 3 and all(_positive(s) for s in spacing)):
            raise BadInputError(f"{where}: preprocessing.spacing_mm {spacing!r} must be three positive mm values.")
        window = pre.get("intensity_window_hu")
        if not (isinstance(window, list | tuple) and len(window) == 2 and all(_number(w) for w in window)
                and window[0] < window[1]):
            raise BadInputError(f"{where}: preprocessing.intensity_window_hu {window!r} must be [low, high] HU "
                                "with low < high.")
        overlap = inf.get("overlap", 0.5) if overlap is None else overlap
        if not (_number(overlap) and 0 <= overlap < 1):
            raise BadInputError(f"overlap: {overlap!r} must be at least 0 and below 1 (0.5: windows overlap by half).")
        blend = inf.get("blend", "gaussian")
        if blend not in ("gaussian", "constant"):
            raise BadInputError(f"{where}: inference.blend '{blend}' is not one of gaussian, constant.")
        keep = inf.get("keep_largest", [])
        unknown = [name for name in keep if info.labels.by_name(name) is None]
        if unknown:
            raise BadInputError(f"{where}: inference.keep_largest names {unknown}, which are not labels "
                                f"({info.labels.describe()}).")
        factor = FAST_SPACING_FACTOR if fast else 1.0
        return cls(tuple(float(s) * factor for s in spacing), (float(window[0]), float(window[1])),
                   bool(pre.get("foreground_crop", True)), info.roi_size, float(overlap), blend,
                   int(info.architecture.get("num_classes", info.labels.num_classes)), tuple(keep))


def segment_volume(image: sitk.Image, model: torch.nn.Module, info: ModelInfo, *, device: str | torch.device = "cpu",
                   fast: bool = False, overlap: float | None = None, tta: bool = False, amp: bool = True,
                   keep_largest: bool | Collection[str | int] = False, roi_lps=None, progress: Progress | None = None,
                   cancel: Callable[[], bool] | None = None, warn: Callable[[str], None] | None = None,
                   sw_batch_size: int | None = None, report: dict[str, Any] | None = None,
                   budget: Callable[[torch.device], memory.Budget] = memory.budget) -> sitk.Image:
    """Segment a 3-D CT ``image`` (any orientation; LPS as SimpleITK reads it) with ``model`` described by ``info``.

    Args:
        device: "cpu", "cuda" or "cuda:N" (the model is moved there).
        fast: predict at ``FAST_SPACING_FACTOR`` × the model spacing (module docstring: accuracy trade-off).
        overlap: window overlap in [0, 1); None takes model.json's ``inference.overlap``.
        tta: also predict the volume flipped along each axis and sum the logits (4 passes).
        amp: mixed precision where the device computes it natively (``plans.amp_dtype``: bf16/fp16 on CUDA, bf16
            on CPUs with AMX or AVX512-BF16); False: float32.
        keep_largest: True: keep only the largest connected component of every label; label names or values: of
            those; False: of the labels model.json's ``inference.keep_largest`` names (none if it names none).
        roi_lps: (min corner, max corner) in LPS mm: compute only there (labels are 0 outside).
        progress: ``progress(stage, fraction, message)`` with stages preprocess, windows, postprocess.
        cancel: polled before every window batch and between stages; True raises ``Cancelled``.
        warn: called with a message for a problem that does not stop the run (non-CT input, empty body box);
            default: logged.
        sw_batch_size: windows per forward pass; None chooses for the device's memory.
        report: if given, filled with device, plan, windows, grids and timings (s) of each stage.
        budget: device -> the memory this job may use there (``memory.budget``, measured after preprocessing).

    Returns:
        uint8 label map on exactly ``image``'s grid (size, spacing, origin, direction); values from the label table.

    Raises:
        BadInputError: not a 3-D scalar image, a model.json setting that cannot be used, an ROI outside the image,
            not enough memory for even the smallest plan (the message says what it needs and what there is).
        Cancelled: ``cancel()`` returned True.
    """
    progress = progress or (lambda stage, fraction, message: None)
    warn = warn or (lambda message: log.warning("%s", message))
    report = {} if report is None else report
    settings = InferenceSettings.from_info(info, fast, overlap)
    io.check_geometry(io.Geometry.of(image), "input image")
    clean = _labels_to_clean(info, settings, keep_largest)
    report.update(device=torch.device(device).type, windows=0, empty_windows=0, box=None, model_grid=[],
                  timings_s={})

    stage = _preprocess(image, settings, roi_lps, progress, warn, report)
    if stage is None:
        return _as_image(np.zeros(tuple(reversed(image.GetSize())), dtype=np.uint8), image)
    box, grid, volume = stage
    _check_cancel(cancel)
    started = time.perf_counter()
    footprint = plans.Footprint.of(model, volume.shape, settings.roi_size, settings.num_classes, tta)
    plan, statement = plans.choose_plan(torch.device(device), footprint, sw_batch_size=sw_batch_size, amp=amp,
                                        budget=budget)
    progress("preprocess", 1.0, statement)
    report["plan_chosen"] = statement
    use_fast_cuda_kernels(plan.device)
    model.eval()
    labels_model, plan, count, empty = windows.predict_labels(
        volume, model, roi=settings.roi_size, overlap=settings.overlap, blend=settings.blend,
        num_classes=settings.num_classes, plan=plan, tta=tta, progress=progress, cancel=cancel)
    del volume, stage
    report.update(device=plan.device.type, plan=plan.describe(), windows=count, empty_windows=empty)
    report["timings_s"]["windows"] = time.perf_counter() - started
    _check_cancel(cancel)
    return _postprocess(labels_model, grid, image, box, clean, progress, report)


def _preprocess(image: sitk.Image, settings: InferenceSettings, roi_lps, progress: Progress,
                warn: Callable[[str], None], report: dict[str, Any]):
    """(box of input voxels computed, model grid, windowed volume (I, J, K) float32 in [0, 1]), or None when there
    is nothing to compute (then ``warn`` says why)."""
    started = time.perf_counter()
    progress("preprocess", 0.0, "finding the body")
    _warn_if_not_ct(image, warn)
    box, empty_reason = _computed_box(image, settings, roi_lps)
    if box is None:
        warn(f"{empty_reason}; the segmentation is empty")
        return None
    progress("preprocess", 0.3, f"resampling {'×'.join(map(str, box.size))} voxels to the model grid")
    grid = geometry.model_grid(geometry.crop(image, box), settings.spacing_mm, settings.window_hu[0] - 1.0)
    volume = _window(grid, settings.window_hu)
    report.update(box={"start": list(box.start), "size": list(box.size)}, model_grid=list(volume.shape))
    report["timings_s"]["preprocess"] = time.perf_counter() - started
    progress("preprocess", 1.0, f"model grid {'×'.join(map(str, volume.shape))} at "
                                f"{'×'.join(f'{s:g}' for s in settings.spacing_mm)} mm")
    return box, grid, volume


def _postprocess(labels_model: np.ndarray, grid: sitk.Image, image: sitk.Image, box: geometry.IndexBox,
                 clean: tuple[int, ...], progress: Progress, report: dict[str, Any]) -> sitk.Image:
    """Model-space labels -> the whole input grid (zeros outside ``box``), largest components kept for ``clean``."""
    started = time.perf_counter()
    progress("postprocess", 0.0, "mapping labels onto the input grid")
    labels_box = geometry.labels_to_input(labels_model, grid, image, box)
    for n, value in enumerate(clean, start=1):
        progress("postprocess", 0.2 + 0.8 * n / (len(clean) + 1), f"largest component of label {value}")
        keep_largest_component(labels_box, value)
    output = np.zeros(tuple(reversed(image.GetSize())), dtype=np.uint8)  # (K, J, I)
    output[box.slices_kji()] = labels_box
    del labels_box
    labels = _as_image(output, image)
    report["timings_s"]["postprocess"] = time.perf_counter() - started
    progress("postprocess", 1.0, "labels on the input grid")
    return labels


def keep_largest_component(labels_kji: np.ndarray, value: int) -> None:
    """Set to 0, in place, every voxel of ``value`` outside its largest face-connected component."""
    mask = labels_kji == value
    if not mask.any():
        return
    components = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.view(np.uint8))),
                                       sortByObjectSize=True)
    labels_kji[mask & (sitk.GetArrayViewFromImage(components) != 1)] = 0


def _labels_to_clean(info: ModelInfo, settings: InferenceSettings, keep_largest) -> tuple[int, ...]:
    if keep_largest is True:
        return info.labels.values
    if keep_largest is False or keep_largest is None:
        return tuple(info.labels.by_name(name).value for name in settings.keep_largest)
    values = []
    for item in keep_largest:
        label = info.labels.by_value(item) if isinstance(item, int) else info.labels.by_name(str(item))
        if label is None:
            raise BadInputError(f"keep-largest: '{item}' is not a label of model '{info.name}' "
                                f"({info.labels.describe()}).")
        values.append(label.value)
    return tuple(dict.fromkeys(values))


def _computed_box(image: sitk.Image, settings: InferenceSettings, roi_lps) -> tuple[geometry.IndexBox | None, str]:
    """The voxels to compute (ROI ∩ body box), or None and why there are none."""
    box = geometry.IndexBox.whole(image)
    if roi_lps is not None:
        box = geometry.check_roi(roi_lps, image, "roi")
    if settings.foreground_crop:
        body = geometry.body_box(image)
        if body is None:
            return None, f"no voxel is above {geometry.BODY_THRESHOLD_HU:g} HU (only air?)"
        box = body.intersect(box)
        if box is None:
            return None, "the ROI holds no voxel of the body"
    return box, ""


def _window(grid: sitk.Image, window_hu: tuple[float, float]) -> np.ndarray:
    """HU -> [0, 1] over the window, clipped, as (I, J, K) float32 (training: ScaleIntensityRanged, clip=True)."""
    low, high = window_hu
    volume = sitk.GetArrayFromImage(grid)  # (K, J, I) float32, our own copy
    volume -= low
    volume *= 1.0 / (high - low)
    np.clip(volume, 0.0, 1.0, out=volume)
    return volume.transpose(2, 1, 0)


def _warn_if_not_ct(image: sitk.Image, warn: Callable[[str], None]) -> None:
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    low, high = stats.GetMinimum(), stats.GetMaximum()
    if high < CT_MAX_BELOW or low > CT_MIN_ABOVE:
        warn(f"input intensities {low:g}..{high:g} do not look like CT in Hounsfield units (air is about -1000, "
             "soft tissue 0..100, bone above 300); this model expects CT, so its result may be meaningless")


def _check_cancel(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("stopped between stages")


def _as_image(labels_kji: np.ndarray, reference: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(labels_kji)
    out.CopyInformation(reference)
    return out


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _positive(value: object) -> bool:
    return _number(value) and value > 0
