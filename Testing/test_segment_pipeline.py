"""segment_volume: labels on exactly the input grid whatever its orientation, computed only where asked, cleaned,
cancellable, and robust to a GPU running out of memory. The predictor is ``EdgeModel`` (segment_helpers), whose
answer is known and depends on the orientation the network is fed."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from segment_helpers import LABELS, WINDOW_HU, EdgeModel, expected_edge_labels, model_info
from torch import nn
from volume_helpers import OBLIQUE, make_image

from mim3d import io
from mim3d.devices import GpuProperties
from mim3d.errors import BadInputError, Cancelled
from mim3d.inference import pipeline, plans, segment_volume, windows
from mim3d.memory import Budget
from mim3d.models import build_segmenter
from mim3d.training.validation import validate_cases

A100 = GpuProperties("NVIDIA A100-SXM4-80GB", 8, 0, 80 * 2**30)
ODD_SPACING = (2.0, 2.5, 3.5)  # model spacing unlike the input's 3 mm, so every variant is really resampled
WHOLE = (224, 160, 64)  # one window covers the model grid: the geometry tests need no stitching (tested apart)


@pytest.fixture(scope="module")
def ct(example_ct_sm_path) -> sitk.Image:
    """Real abdominal CT slab, 122×101×30 at 3 mm, stored RAS (LPS direction diag(-1, -1, 1))."""
    return io.read_volume(example_ct_sm_path)


def segment(image, info=None, **options) -> sitk.Image:
    return segment_volume(image, EdgeModel(), info or model_info(roi_size=(64, 64, 32)), **options)


def assert_same_grid(labels: sitk.Image, image: sitk.Image) -> None:
    assert labels.GetSize() == image.GetSize()
    assert labels.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(labels.GetSpacing(), image.GetSpacing(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(labels.GetOrigin(), image.GetOrigin(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(labels.GetDirection(), image.GetDirection(), rtol=0, atol=1e-12)


def on_grid(labels: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """Labels resampled (nearest) onto ``reference``'s grid, as a (K, J, I) array."""
    return sitk.GetArrayFromImage(sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0))


def test_labels_equal_the_known_answer_on_a_ras_grid_at_the_model_spacing(ct):
    labels = segment(ct, model_info(spacing_mm=(3.0, 3.0, 3.0), roi_size=(64, 64, 32)))
    assert_same_grid(labels, ct)
    expected = expected_edge_labels(io.image_to_ras(io.orient_ras(ct))[0])
    got = io.image_to_ras(io.orient_ras(labels))[0]
    assert np.bincount(expected.ravel()).tolist()[1:] != [0, 0]
    np.testing.assert_array_equal(got, expected)


def test_permuted_flipped_and_lps_copies_give_identical_labels_in_physical_space(ct):
    info = model_info(spacing_mm=ODD_SPACING, roi_size=WHOLE)
    reference = segment(ct, info)
    variants = {"LPS": sitk.DICOMOrient(ct, "LPS"), "permuted": sitk.PermuteAxes(ct, [2, 0, 1]),
                "flipped": sitk.Flip(ct, [True, False, True])}
    assert sitk.GetArrayViewFromImage(reference).max() == 2
    for name, image in variants.items():
        labels = segment(image, info)
        assert_same_grid(labels, image)
        np.testing.assert_array_equal(on_grid(labels, ct), sitk.GetArrayViewFromImage(reference), err_msg=name)


def test_segmentation_sits_on_an_oblique_input_grid(ct):
    oblique = _oblique_copy(ct)
    info = model_info(spacing_mm=ODD_SPACING, roi_size=WHOLE)
    labels = segment(oblique, info)
    assert_same_grid(labels, oblique)
    # Compare tissue (labels 1 and 2 together: the edge class follows the oblique axes) in the original frame, on
    # voxels at least 2 voxels from a tissue boundary and inside the oblique grid.
    tissue = sitk.GetArrayFromImage(segment(ct, info)) > 0
    mapped = on_grid(labels, ct) > 0
    covered = on_grid(sitk.Cast(oblique > -1e9, sitk.sitkUInt8), ct) > 0  # ones on the oblique grid
    inner = sitk.GetArrayFromImage(sitk.BinaryErode(_mask(tissue, ct), [2] * 3))
    outer = sitk.GetArrayFromImage(sitk.BinaryDilate(_mask(tissue, ct), [2] * 3))
    away = covered & ((inner > 0) | (outer == 0))
    assert away.sum() > 0.4 * away.size
    assert (mapped[away] == tissue[away]).mean() >= 0.99


def _oblique_copy(image: sitk.Image) -> sitk.Image:
    """``image`` linearly resampled onto a 3 mm grid rotated by ``OBLIQUE``, covering it whole."""
    corners = np.array([image.TransformIndexToPhysicalPoint([int(c * (n - 1)) for c, n in zip(corner, image.GetSize(),
                                                                                          strict=True)])
                        for corner in np.ndindex(2, 2, 2)])
    local = corners @ OBLIQUE  # coordinates along the oblique axes
    low, high = local.min(axis=0), local.max(axis=0)
    size = [int(np.ceil(s / 3.0)) + 1 for s in high - low]
    reference = make_image(np.zeros(size[::-1], np.uint8), spacing=(3.0, 3.0, 3.0), origin=OBLIQUE @ low,
                           direction=OBLIQUE)
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)


def _mask(array_kji: np.ndarray, reference: sitk.Image) -> sitk.Image:
    mask = sitk.GetImageFromArray(array_kji.astype(np.uint8))
    mask.CopyInformation(reference)
    return mask


def test_roi_restricts_the_computed_region(ct):
    info = model_info(spacing_mm=(3.0, 3.0, 3.0), roi_size=(64, 64, 32))
    full_report, roi_report = {}, {}
    full = sitk.GetArrayFromImage(segment(ct, info, report=full_report))
    start, stop = (30, 20, 5), (70, 60, 25)  # voxel box (I, J, K), stop exclusive
    corners = [ct.TransformIndexToPhysicalPoint(start), ct.TransformIndexToPhysicalPoint([s - 1 for s in stop])]
    labels = segment(ct, info, roi_lps=corners, report=roi_report)
    assert_same_grid(labels, ct)
    got = sitk.GetArrayFromImage(labels)
    box = tuple(slice(a, b) for a, b in zip(reversed(start), reversed(stop), strict=True))
    outside = np.ones(got.shape, bool)
    outside[box] = False
    assert not got[outside].any()
    assert roi_report["box"] == {"start": list(start), "size": [b - a for a, b in zip(start, stop, strict=True)]}
    assert roi_report["windows"] < full_report["windows"]
    # Inside, tissue is as in the full run (the edge class may differ on the box's last I row, where the ROI ends).
    np.testing.assert_array_equal(got[box] > 0, full[box] > 0)


def test_roi_outside_the_image_is_refused(ct):
    with pytest.raises(BadInputError, match=r"roi: the ROI .* does not overlap the image"):
        segment(ct, roi_lps=((5000.0, 5000.0, 5000.0), (5100.0, 5100.0, 5100.0)))


def island_volume() -> sitk.Image:
    """Air with a 20×20×12 block of soft tissue and a separate 3×3×3 island."""
    hu = np.full((24, 40, 48), -1000, np.int16)
    hu[6:18, 10:30, 8:28] = 100
    hu[10:13, 15:18, 38:41] = 100
    return make_image(hu, spacing=(2.0, 2.0, 2.0))


@pytest.mark.parametrize("option", [True, {"tissue", "right edge"}, False])
def test_keep_largest_removes_a_small_island(option):
    # False: the model's own default, here model.json naming both labels in inference.keep_largest
    info = model_info(spacing_mm=(2.0, 2.0, 2.0), roi_size=(32, 32, 32), keep_largest=["tissue", "right edge"])
    plain = sitk.GetArrayFromImage(segment(island_volume(), model_info(spacing_mm=(2.0, 2.0, 2.0))))
    cleaned = sitk.GetArrayFromImage(segment(island_volume(), info, keep_largest=option))
    assert plain[10:13, 15:18, 38:41].all() and not cleaned[10:13, 15:18, 38:41].any()
    np.testing.assert_array_equal(cleaned[:, :, :34], plain[:, :, :34])


def test_keep_largest_of_an_unknown_label_is_refused():
    with pytest.raises(BadInputError, match="keep-largest: 'liver' is not a label of model 'test-model'"):
        segment(island_volume(), keep_largest={"liver"})


def test_fast_mode_predicts_at_twice_the_spacing_and_returns_to_the_input_grid(ct):
    info = model_info(spacing_mm=(3.0, 3.0, 3.0), roi_size=(64, 64, 32))
    normal_report, fast_report = {}, {}
    normal = sitk.GetArrayFromImage(segment(ct, info, report=normal_report)) > 0
    labels = segment(ct, info, fast=True, report=fast_report)
    assert_same_grid(labels, ct)
    assert fast_report["model_grid"] == [-(-n // 2) for n in normal_report["model_grid"]]
    assert ((sitk.GetArrayViewFromImage(labels) > 0) == normal).mean() > 0.9


def test_slabs_give_the_same_labels_as_one_pass(ct, monkeypatch):
    info = model_info(spacing_mm=(3.0, 3.0, 1.5), roi_size=(128, 112, 16))  # windows step along K only
    whole = sitk.GetArrayFromImage(segment(ct, info))
    monkeypatch.setattr(windows, "LOGITS_BUDGET_BYTES", 3 * 122 * 100 * 4 * 20)  # 20 of the 60 K planes at a time
    assert len(windows.slabs(60, 16, 20)) == 3
    np.testing.assert_array_equal(sitk.GetArrayFromImage(segment(ct, info)), whole)


def test_tta_runs_four_flipped_passes_and_keeps_a_consistent_answer(ct):
    info = model_info(spacing_mm=(3.0, 3.0, 3.0), roi_size=(64, 64, 32))
    plain_report, tta_report = {}, {}
    plain = sitk.GetArrayFromImage(segment(ct, info, report=plain_report))
    augmented = sitk.GetArrayFromImage(segment(ct, info, tta=True, report=tta_report))
    assert tta_report["windows"] == 4 * plain_report["windows"]
    # 3 of the 4 passes give EdgeModel's answer; only at the volume's corners, where MONAI's Gaussian weights are all
    # clamped to the same minimum, a window's spurious border answer can tie with the right one.
    assert (augmented != plain).mean() < 1e-4


class RunsOutOfMemoryWithTwoWindows(EdgeModel):
    def forward(self, x):
        if x.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().forward(x)


def test_out_of_memory_retries_with_a_smaller_window_batch_and_says_so(ct):
    events = []
    model = RunsOutOfMemoryWithTwoWindows()
    info = model_info(spacing_mm=(3.0, 3.0, 3.0), roi_size=(64, 64, 32))
    labels = segment_volume(ct, model, info, sw_batch_size=2, progress=lambda *e: events.append(e))
    assert any("out of memory (cpu, 2 window(s) per pass, " in e[2] and "; retrying with cpu, 1 window(s)" in e[2]
               for e in events)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(labels), sitk.GetArrayFromImage(segment(ct, info)))
    fractions = [e[1] for e in events if e[0] == "windows"]
    assert fractions[-1] == 1.0


def test_out_of_memory_fallbacks_halve_the_batch_then_move_the_output_then_everything_to_the_cpu():
    cuda = torch.device("cuda")
    for amp in (True, False):
        plan, steps = plans.Plan(cuda, 4, cuda, amp), []
        while plan is not None:
            steps.append((plan.device.type, plan.sw_batch_size, plan.output_device.type, plan.amp))
            plan = plans.fallback(plan)
        assert steps == [("cuda", 4, "cuda", amp), ("cuda", 2, "cuda", amp), ("cuda", 1, "cuda", amp),
                         ("cuda", 1, "cpu", amp), ("cpu", 1, "cpu", amp)]


CUBLAS_ALLOC_FAILED = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
CUDNN_NO_WORKSPACE = "cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"
CUDNN_ALLOC_FAILED = "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"


def cpu_allocation_failure() -> RuntimeError:
    """The real error of torch's CPU allocator when a request cannot be met."""
    try:
        torch.empty(2**60, dtype=torch.uint8)
    except RuntimeError as e:
        return e
    pytest.fail("allocating 2**60 bytes succeeded")


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 7.79 GiB"),
    RuntimeError(CUBLAS_ALLOC_FAILED), RuntimeError(CUDNN_NO_WORKSPACE), RuntimeError(CUDNN_ALLOC_FAILED),
    RuntimeError("MPS backend out of memory (MPS allocated: 5.00 GB, other allocations: 1.00 GB)"),
    MemoryError("Unable to allocate 8.00 GiB for an array with shape (1024, 1024, 1024)"),
])
def test_out_of_memory_is_recognised_in_every_form_torch_cublas_and_cudnn_raise_it(error):
    assert plans.is_out_of_memory(error)


def test_the_cpu_allocators_failure_is_out_of_memory_and_other_errors_are_not():
    assert plans.is_out_of_memory(cpu_allocation_failure())
    assert not plans.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not plans.is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_BAD_PARAM"))
    assert not plans.is_out_of_memory(ValueError("a window of 96³ does not fit the volume"))


class RaisesWithTwoWindows(EdgeModel):
    """EdgeModel whose passes with more than one window fail as a GPU library fails when its allocation does."""

    def __init__(self, message: str):
        super().__init__()
        self.message = message

    def forward(self, x):
        if x.shape[0] > 1:
            raise RuntimeError(self.message)
        return super().forward(x)


@pytest.mark.parametrize("message", [CUBLAS_ALLOC_FAILED, CUDNN_NO_WORKSPACE, CUDNN_ALLOC_FAILED])
def test_a_cublas_or_cudnn_allocation_failure_steps_down_the_window_batch_and_says_what_was_reduced(ct, message):
    events, info = [], model_info(spacing_mm=(3.0, 3.0, 3.0), roi_size=(64, 64, 32))
    labels = segment_volume(ct, RaisesWithTwoWindows(message), info, sw_batch_size=2,
                            progress=lambda *e: events.append(e))
    retries = [e[2] for e in events if "out of memory" in e[2]]
    assert len(retries) == 1 and retries[0].startswith("CPU out of memory (cpu, 2 window(s) per pass, ")
    assert retries[0].endswith(": window batch 2 -> 1")
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(labels), sitk.GetArrayFromImage(segment(ct, info)))


class RunsOutOfMemoryWhileMoving(EdgeModel):
    """EdgeModel whose first move to a device fails as ``model.to("cuda")`` does on a full GPU."""

    def __init__(self):
        super().__init__()
        self.moves = 0

    def _apply(self, fn, recurse=True):
        self.moves += 1
        if self.moves == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return super()._apply(fn, recurse)


def test_out_of_memory_while_moving_the_model_to_the_device_steps_down_too(ct):
    events, model = [], RunsOutOfMemoryWhileMoving()
    info = model_info(spacing_mm=(3.0, 3.0, 3.0), roi_size=(64, 64, 32))
    labels = segment_volume(ct, model, info, sw_batch_size=2, progress=lambda *e: events.append(e))
    assert any(e[2].endswith(": window batch 2 -> 1") for e in events)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(labels), sitk.GetArrayFromImage(segment(ct, info)))


def fixed(gigabytes: float, host_gigabytes: float = 16.0):
    """A memory budget of ``gigabytes`` on the compute device and ``host_gigabytes`` of RAM."""
    return lambda device: Budget(int((gigabytes if device.type == "cuda" else host_gigabytes) * 1e9), "test budget")


def test_the_plan_is_chosen_from_the_budget_and_stated_before_the_windows(ct):
    events, info = [], model_info(spacing_mm=(3.0, 3.0, 1.5), roi_size=(128, 112, 16))
    model, report = EdgeModel(), {}
    labels = segment_volume(ct, model, info, budget=fixed(0, host_gigabytes=0.05), report=report,
                            progress=lambda *e: events.append(e))
    statements = [e for e in events if e[2].startswith("plan: ")]
    assert len(statements) == 1 and events.index(statements[0]) < [e[0] for e in events].index("windows")
    assert re.fullmatch(r"plan: cpu, 1 window\(s\) per pass, \w+, slabs of \d+ of its 60 planes; memory 0.1 GB "
                        r"\(test budget\)", statements[0][2])
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(labels), sitk.GetArrayFromImage(segment(ct, info)))


def test_a_volume_whose_smallest_plan_does_not_fit_is_refused_before_any_window(ct):
    model = EdgeModel()
    with pytest.raises(BadInputError, match=r"not enough memory to segment a 122×100×60 model grid: even cpu, 1 "
                                            r"window\(s\) per pass, \w+ needs [\d.]+ GB \(.*\), and this job may use "
                                            r"0.0 GB \(test budget\); close other programs"):
        segment_volume(ct, model, model_info(spacing_mm=(3.0, 3.0, 1.5), roi_size=(128, 112, 16)),
                       budget=fixed(0, host_gigabytes=0.01))
    assert model.calls == 0


@pytest.fixture(scope="module")
def base_footprint() -> plans.Footprint:
    """mim-unetr base, 7 classes, 96³ windows, on the model grid of a 512×512×300 abdominal CT at 1.5×1.5×2 mm."""
    model = build_segmenter("mim-unetr", 7, preset="base", roi_size=(96, 96, 96))
    return plans.Footprint.of(model, (280, 280, 230), (96, 96, 96), 7, False)


def test_a_gpu_with_more_free_memory_never_gets_a_smaller_plan_and_every_plan_fits(base_footprint):
    cuda, chosen = torch.device("cuda", 0), []
    for gigabytes in (2, 2.5, 3, 4, 6, 8, 12, 24, 40, 80):
        plan, _ = plans.choose_plan(cuda, base_footprint, budget=fixed(gigabytes), gpu=A100)
        on_gpu = plan.device.type == "cuda"
        chosen.append((on_gpu, plan.output_device.type == "cuda", plan.sw_batch_size if on_gpu else 0))
        if on_gpu:
            used = base_footprint.weights + plan.sw_batch_size * base_footprint.window
            used += min(plan.slab_planes, 230) * (base_footprint.input_plane
                                                   + base_footprint.plane * (plan.output_device.type == "cuda"))
            assert used <= gigabytes * 1e9
    assert chosen == sorted(chosen)
    assert chosen[0] == (False, False, 0) and chosen[-1] == (True, True, 8)
    assert (True, False, 1) in chosen  # the logits in RAM before giving up the GPU


def test_validation_during_fine_tuning_streams_through_the_same_plans_and_fallbacks(ct):
    """A model that fails with more than one window per pass, as a GPU library does when validation's fixed batch of 4
    meets a GPU full of training state: validation plans its batch like `mim3d segment` and scores the case."""
    volume = pipeline._window(sitk.Cast(io.orient_ras(ct), sitk.sitkFloat32), WINDOW_HU)  # (I, J, K) in [0, 1]
    label = torch.from_numpy(expected_edge_labels(io.image_to_ras(io.orient_ras(ct))[0]).astype(np.int64))
    case = {"name": "ct", "image": MetaTensor(torch.from_numpy(np.ascontiguousarray(volume))[None]),
            "label": MetaTensor(label[None])}
    model = RaisesWithTwoWindows(CUBLAS_ALLOC_FAILED).train()
    per_case = validate_cases(model, [case], [0], LABELS, (64, 64, 32), torch.device("cpu"), "fp32")
    assert per_case == {"ct": {"tissue": 1.0, "right edge": 1.0}}
    assert model.training


def cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    return {flag for line in cpuinfo.read_text().splitlines() if line.startswith("flags")
            for flag in line.split(":", 1)[1].split()}


def test_cpu_mixed_precision_is_bf16_exactly_where_the_cpu_computes_bf16_natively():
    native = bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})
    assert plans.amp_dtype(torch.device("cpu")) == (torch.bfloat16 if native else None)


class RecordsPrecision(EdgeModel):
    """EdgeModel that also runs a real convolution and records the dtype it computed in."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 1, 1)
        self.dtypes = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.dtypes.add(self.conv(x).dtype)
        return super().forward(x)


@pytest.mark.parametrize("amp", [True, False])
def test_amp_runs_the_network_in_the_devices_native_lower_precision_and_no_amp_in_float32(ct, amp):
    model, report = RecordsPrecision(), {}
    labels = segment_volume(ct, model, model_info(roi_size=(64, 64, 32)), amp=amp, report=report)
    dtype = (plans.amp_dtype(torch.device("cpu")) if amp else None) or torch.float32
    assert model.dtypes == {dtype}
    assert report["plan"].endswith(str(dtype).removeprefix("torch."))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(labels), sitk.GetArrayFromImage(segment(ct)))


def test_window_count_matches_the_windows_monai_visits(ct):
    model, events = EdgeModel(), []
    report = {}
    segment_volume(ct, model, model_info(roi_size=(32, 32, 32), overlap=0.3), report=report,
                   progress=lambda *e: events.append(e))
    window_events = [e for e in events if e[0] == "windows"]
    assert report["windows"] == model.calls == len(window_events)
    assert window_events[-1][2] == f"window {model.calls}/{model.calls}"


def test_all_air_windows_share_one_forward_pass_and_keep_the_exact_answer():
    hu = np.full((32, 32, 160), -1000, np.int16)  # (K, J, I): two blocks of tissue 100 voxels apart along I
    hu[8:24, 8:24, 4:20] = 100
    hu[8:24, 8:24, 130:150] = 60
    image = make_image(hu, spacing=(1.0, 1.0, 1.0))
    model, report = EdgeModel(), {}
    info = model_info(spacing_mm=(1.0, 1.0, 1.0), roi_size=(32, 32, 32), overlap=0.0, foreground_crop=False)
    labels = segment_volume(image, model, info, report=report)
    assert report["windows"] == 5 and report["empty_windows"] == 3  # windows at I = 32, 64, 96
    assert model.calls == report["windows"] - report["empty_windows"] + 1
    expected = expected_edge_labels(io.image_to_ras(io.orient_ras(image))[0])
    np.testing.assert_array_equal(io.image_to_ras(io.orient_ras(labels))[0], expected)


def test_cancel_stops_between_windows():
    done = []
    with pytest.raises(Cancelled, match="stopped after 3 of 30 windows"):
        segment_volume(island_volume(), EdgeModel(), model_info(spacing_mm=(1.0, 1.0, 1.0)),
                       progress=lambda stage, fraction, message: done.append(stage) if stage == "windows" else None,
                       cancel=lambda: len(done) >= 3)
    assert len(done) == 3


def test_input_that_does_not_look_like_ct_is_segmented_with_a_warning(example_data):
    messages = []
    mr = io.read_volume(example_data / "example_mr_sm.nii.gz")  # abdominal MR, values -47..833
    labels = segment(mr, model_info(spacing_mm=(6.0, 6.0, 6.0), roi_size=(32, 32, 32)), warn=messages.append)
    assert_same_grid(labels, mr)
    assert any("do not look like CT in Hounsfield units" in m for m in messages)


def test_an_all_air_volume_gives_an_empty_segmentation_with_a_warning():
    messages = []
    air = make_image(np.full((8, 16, 16), -1000, np.int16) + np.arange(16, dtype=np.int16))
    labels = segment(air, warn=messages.append)
    assert_same_grid(labels, air)
    assert not sitk.GetArrayViewFromImage(labels).any()
    assert messages[-1] == "no voxel is above -500 HU (only air?); the segmentation is empty"


@pytest.mark.parametrize(("section", "key", "value", "message"), [
    ("preprocessing", "orientation", "LPS", "preprocessing.orientation 'LPS' is not supported"),
    ("preprocessing", "spacing_mm", [1.5, 0, 2], r"preprocessing.spacing_mm \[1.5, 0, 2\] must be three positive"),
    ("preprocessing", "intensity_window_hu", [250, -175], "intensity_window_hu .* must be \\[low, high\\] HU"),
    ("inference", "blend", "median", "inference.blend 'median' is not one of gaussian, constant"),
    ("inference", "overlap", 1.0, "overlap: 1.0 must be at least 0 and below 1"),
])
def test_a_model_setting_that_cannot_be_used_is_refused_naming_model_json(section, key, value, message):
    info = model_info()
    getattr(info, section)[key] = value
    with pytest.raises(BadInputError, match=message):
        pipeline.InferenceSettings.from_info(info)
