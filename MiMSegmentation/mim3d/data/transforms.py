"""Pre-processing for pre-training (METHOD.md §8.2) and fine-tuning (§9.5) as MONAI dictionary transforms.

Each dataset has a deterministic part (read through ``mim3d.io``, orient to RAS, resample, window, crop, pad), cached
on disk by ``mim3d.data.cache``, and a random part (crops, augmentations) whose randomness is a pure function of
(seed, epoch, index): call ``dataset.set_epoch(epoch)`` before each epoch, and a resumed, multi-worker or multi-process
run sees exactly the crops of an uninterrupted single-process run.

A training volume that cannot be read any more (deleted or damaged after discovery, or degenerate voxels found only
now) is logged and replaced by the next readable one, deterministically; ``dataset.skipped`` counts these
replacements across DataLoader workers (shared memory).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    MapTransform,
    RandAffined,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandomizableTransform,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)
from torch.utils.data import Dataset

from .. import io
from ..errors import BadInputError
from .cache import PreprocessedCache, dequantize
from .discovery import VolumeRecord
from .finetune_sources import FinetuneCase, read_label

log = logging.getLogger(__name__)
ORIENTATION = "RAS"  # §8.2 step 2 and §9.5, by mim3d.io.orient_ras (MONAI's Orientation needs nibabel)
CACHE_VERSION = 1  # part of every cache key: bump when the deterministic pipeline changes
# What a volume that broke after discovery raises (mim3d.io turns SimpleITK errors into BadInputError). Reading
# happens before the MONAI Compose, which would wrap every error, bugs included, in a RuntimeError.
_LOAD_ERRORS = (BadInputError, OSError)

Source = VolumeRecord | Path


# ---- settings -----------------------------------------------------------------------------------------------------

def _check_window(hu_window: tuple[float, float]) -> None:
    if len(hu_window) != 2 or not hu_window[0] < hu_window[1]:
        raise BadInputError(f"hu_window: {tuple(hu_window)} must be (low, high) HU with low < high.")


@dataclass(frozen=True)
class PretrainPreprocessing:
    """METHOD.md §8.2: RAS, clip HU to the window and scale to [0, 1], zero-pad to crop_size, one random crop."""

    crop_size: int = 192  # §8.2: pad every axis to >= 192, one uniform 192³ crop (2·input_size for MiM)
    hu_window: tuple[float, float] = (-1000.0, 1000.0)  # §8.2 step 3; padding value 0 is then -1000 HU

    def validate(self) -> None:
        if not isinstance(self.crop_size, int) or self.crop_size < 1:
            raise BadInputError(f"crop_size: {self.crop_size!r} must be a positive number of voxels.")
        _check_window(self.hu_window)


@dataclass(frozen=True)
class FinetunePreprocessing:
    """METHOD.md §9.5 (BTCV recipe): RAS, resample, window to [0, 1], foreground crop, pos/neg crops, augmentation."""

    spacing_mm: tuple[float, float, float] = (1.5, 1.5, 2.0)  # §9.5 [PAPER-T2]; bilinear image, nearest label
    hu_window: tuple[float, float] = (-175.0, 250.0)  # §9.5, clipped
    roi: tuple[int, int, int] = (96, 96, 96)  # §9.5 crop size; volumes are zero-padded up to it
    num_samples: int = 4  # crops per volume and step (§9.5 code: 4 samples/volume)
    pos: float = 1.0  # RandCropByPosNegLabel weights of foreground / background centres (§9.5 code: 1, 1)
    neg: float = 1.0
    # Instead, crops centred on a voxel of label value v with weight class_ratios[v] (RandCropByLabelClasses; a value
    # missing from a case is skipped there): equal weights show a small organ as often as a large one.
    class_ratios: tuple[float, ...] = ()
    flip_prob: float = 0.1  # per axis (§9.5 "flip 0.1")
    rot90_prob: float = 0.1  # §9.5 "rotation 0.1": RandRotate90, max_k 3
    scale_intensity_prob: float = 0.5  # §9.5 "intensity shift 0.5", applied to both intensity transforms as the code
    shift_intensity_prob: float = 0.5
    intensity_factor: float = 0.1  # RandScaleIntensity factors (§9.5 code)
    intensity_offset: float = 0.1  # RandShiftIntensity offsets (§9.5 code)
    # Beyond §9.5, what `mim3d segment` meets: thin slabs and partial scans padded with zeros by the sliding windows
    # (RandSlabd), and other scanners or contrast phases (RandTissueIntensityd: ±0.15 of the default window is ±64 HU).
    slab_prob: float = 0.3
    slab_mm: tuple[float, float] = (20.0, 100.0)  # thickness of the kept slab, drawn uniformly in slices
    tissue_intensity_prob: float = 0.5
    tissue_scale: float = 0.1  # factor drawn from 1 ± this
    tissue_offset: float = 0.15  # offset drawn from ± this, in window units
    # Another body, and the body elsewhere in the window (RandAffined): `mim3d segment` tiles the body box, which arms
    # beside the body or the table make wider than the body, while the crops of a body-cropped training scan hold
    # the body in one place; a model trained so learns where the organs sit in the window, not beside what.
    affine_prob: float = 0.5
    rotate_deg: float = 15.0  # turn about the slice normal, ± this
    zoom: float = 0.15  # factor 1 ± this along each axis
    shift: float = 0.25  # in-plane, ± this fraction of the crop

    def validate(self) -> None:
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise BadInputError(f"spacing_mm: {tuple(self.spacing_mm)} must be three positive millimetre values.")
        _check_window(self.hu_window)
        if len(self.roi) != 3 or min(self.roi) < 1:
            raise BadInputError(f"roi: {tuple(self.roi)} must be three positive numbers of voxels.")
        if self.num_samples < 1 or min(self.pos, self.neg) < 0 or self.pos + self.neg <= 0:
            raise BadInputError(f"num_samples {self.num_samples}, pos {self.pos}, neg {self.neg}: need at least one "
                                "crop and non-negative weights, not both 0.")
        if self.class_ratios and (min(self.class_ratios) < 0 or not any(self.class_ratios)):
            raise BadInputError(f"class_ratios: {tuple(self.class_ratios)} must be non-negative, not all 0.")
        if len(self.slab_mm) != 2 or not 0 < self.slab_mm[0] <= self.slab_mm[1]:
            raise BadInputError(f"slab_mm: {tuple(self.slab_mm)} must be (thinnest, thickest) mm, 0 < thinnest <= "
                                "thickest.")
        if not (self.rotate_deg >= 0 and 0 <= self.zoom < 1 and self.shift >= 0):
            raise BadInputError(f"rotate_deg {self.rotate_deg}, zoom {self.zoom}, shift {self.shift}: need a "
                                "non-negative angle and shift and a zoom in [0, 1).")
        if not (0 <= self.tissue_scale < 1 and self.tissue_offset >= 0):
            raise BadInputError(f"tissue_scale {self.tissue_scale}, tissue_offset {self.tissue_offset}: need a scale "
                                "in [0, 1) and a non-negative offset.")
        for name in ("flip_prob", "rot90_prob", "affine_prob", "scale_intensity_prob", "shift_intensity_prob",
                     "slab_prob", "tissue_intensity_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise BadInputError(f"{name}: {getattr(self, name)} must lie in [0, 1].")


# ---- loading ------------------------------------------------------------------------------------------------------

def source_files(source: Source) -> list[Path]:
    """Every file a volume is read from (cache keys hash them): the file, .mhd + data, or DICOM slices."""
    if isinstance(source, VolumeRecord):
        return list(source.files) or [source.path]
    path = Path(source)
    if path.is_dir():
        return [f for _, files in io.list_dicom_series(path) for f in files]
    return [path]


def read_source(source: Source) -> sitk.Image:
    """The volume of a VolumeRecord or a path, checked (``mim3d.io.check_volume``)."""
    return source.read() if isinstance(source, VolumeRecord) else io.read_volume(source)


def to_metatensor(image: sitk.Image, name: str) -> MetaTensor:
    """A SimpleITK image as a float32 MetaTensor (1, I, J, K) with its voxel -> RAS affine, as MONAI's loaders give."""
    array, affine_ras = io.image_to_ras(image)
    data = torch.from_numpy(np.ascontiguousarray(array)).float()[None]
    return MetaTensor(data, affine=torch.from_numpy(affine_ras), meta={"filename_or_obj": name})


def load_volume(source: Source) -> dict[str, MetaTensor]:
    """{"image": (1, I, J, K) float32 HU, oriented RAS} of a VolumeRecord or path."""
    name = str(source.path if isinstance(source, VolumeRecord) else source)
    return {"image": to_metatensor(io.orient_ras(read_source(source)), name)}


def load_case(case: FinetuneCase) -> dict[str, MetaTensor]:
    """{"image": (1, I, J, K) float32 HU, "label": (1, I, J, K) table values}, on one grid, oriented RAS."""
    image = read_source(case.image)
    label = read_label(case, image)
    return {"image": to_metatensor(io.orient_ras(image), str(case.image_path)),
            "label": to_metatensor(io.orient_ras(label), str(case.label))}


# ---- datasets -----------------------------------------------------------------------------------------------------

def epoch_seed(seed: int, epoch: int, index: int) -> int:
    """The 32-bit seed of item ``index`` in ``epoch``: a pure function, the same in every worker and process."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class _EpochDataset(Dataset):
    """Shared by the training datasets: the epoch, deterministic seeds and replacement of unreadable volumes."""

    def __init__(self, sources: Sequence[Any], seed: int):
        if not sources:
            raise BadInputError("no volumes to train on.")
        self.sources, self.seed = list(sources), int(seed)
        # Shared memory, so persistent DataLoader workers see set_epoch and the main process sees their replacements
        # (counted per requested index: each index is loaded by one worker per epoch, so no two writers race).
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._replacements = torch.zeros(len(self.sources), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops the next items get; call it before iterating the DataLoader."""
        self._epoch[0] = int(epoch)

    @property
    def skipped(self) -> int:
        """How many times an unreadable volume was replaced by the next readable one, since construction."""
        return int(self._replacements.sum())

    def _first_readable(self, index: int, load) -> Any:
        n = len(self.sources)
        for step in range(n):
            j = (index + step) % n
            try:
                return load(j)
            except _LOAD_ERRORS as e:
                log.warning("skipping %s this time (%s); using the next volume instead", self._name(j), e)
                self._replacements[index] += 1
        raise BadInputError(f"none of the {n} training volumes could be read; see the warnings above.")

    def _name(self, j: int) -> str:
        source = self.sources[j]
        return str(getattr(source, "path", source))


class PretrainingDataset(_EpochDataset):
    """Item i: float32 tensor (1, S, S, S) in [0, 1], RAS, one random S³ crop, a pure function of (seed, epoch, i)."""

    def __init__(self, volumes: Sequence[Source], settings: PretrainPreprocessing, cache_dir: Path | None, seed: int):
        settings.validate()
        super().__init__(volumes, seed)
        self.settings = settings
        low, high = settings.hu_window
        self.cache = PreprocessedCache(cache_dir, "pretrain", {"version": CACHE_VERSION, **asdict(settings),
                                                               "orientation": ORIENTATION})
        self.preprocess = Compose([
            ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
            SpatialPadd("image", spatial_size=settings.crop_size),  # zeros, i.e. the window's low end (§8.2 step 4)
        ])

    def _load(self, j: int) -> dict[str, Any]:
        source = self.sources[j]

        def build() -> dict[str, Any]:
            image = self.preprocess(load_volume(source))["image"]
            return {"image": image.numpy(), "meta": {"affine": image.affine.tolist()}}

        return self.cache.get(source_files(source), build, mmap=True)

    def __getitem__(self, index: int) -> torch.Tensor:
        stored = self._first_readable(index, self._load)["image"]  # (1, I, J, K) uint16, I, J, K >= S
        s = self.settings.crop_size
        rng = np.random.default_rng(epoch_seed(self.seed, self.epoch, index))
        start = [int(rng.integers(0, n - s + 1)) for n in stored.shape[1:]]  # uniform position (§8.2 step 5)
        crop = stored[:, start[0]: start[0] + s, start[1]: start[1] + s, start[2]: start[2] + s]
        return torch.from_numpy(dequantize(crop))


def pretraining_dataset(volumes: Sequence[Source], crop_size: int, cache_dir: Path | None,
                        hu_window: tuple[float, float] = (-1000.0, 1000.0), seed: int = 0) -> PretrainingDataset:
    """The pre-training dataset of METHOD.md §8.2 over ``volumes`` (records from ``discover_volumes``, or paths).

    Item i: float32 tensor (1, S, S, S), S = crop_size, values in [0, 1] (HU window -> [0, 1], padding 0), RAS; the
    crop position depends only on (seed, epoch, i). Call ``set_epoch`` each epoch; read ``skipped`` for the count
    of unreadable volumes replaced.
    """
    return PretrainingDataset(volumes, PretrainPreprocessing(crop_size, tuple(hu_window)), cache_dir, seed)


def _finetune_preprocess(settings: FinetunePreprocessing) -> Compose:
    keys = ["image", "label"]
    low, high = settings.hu_window
    return Compose([
        Spacingd(keys, pixdim=settings.spacing_mm, mode=("bilinear", "nearest")),
        ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys, source_key="image", allow_smaller=True),  # voxels above the window's low end (§9.5)
        SpatialPadd(keys, spatial_size=settings.roi),  # so every crop fits; zeros = background / window low end
    ])


class _FinetuneCached:
    """The deterministic fine-tuning part of one case, through the cache: image uint16, label uint8, meta."""

    def __init__(self, settings: FinetunePreprocessing, cache_dir: Path | None):
        settings.validate()
        self.settings = settings
        deterministic = {k: v for k, v in asdict(settings).items() if k in ("spacing_mm", "hu_window", "roi")}
        self.cache = PreprocessedCache(cache_dir, "finetune", {"version": CACHE_VERSION, **deterministic,
                                                               "orientation": ORIENTATION})
        self.preprocess = _finetune_preprocess(settings)

    def __call__(self, case: FinetuneCase) -> dict[str, Any]:
        def build() -> dict[str, Any]:
            d = self.preprocess(load_case(case))
            return {"image": d["image"].numpy(), "label": np.rint(d["label"].numpy()).astype(np.uint8),
                    "meta": {"affine": d["image"].affine.tolist(), "name": case.name}}

        label_map = sorted((str(k), v) for k, v in case.label_map.items()) if case.label_map else None
        return self.cache.get(source_files(case.image) + [case.label], build, extra=label_map)


class RandSlabd(RandomizableTransform, MapTransform):
    """With probability ``prob``, keep ``n`` consecutive slices (K, the last axis) at a random place, ``n`` drawn from
    ``slices`` (low, high), and set the others to 0 in every key: what the sliding windows pad a thin slab or a
    partial scan with (image 0 is the window's low end, label 0 background)."""

    def __init__(self, keys, prob: float, slices: tuple[int, int]):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        self.slices = slices

    def __call__(self, data):
        d = dict(data)
        self.randomize(None)
        depth = d[self.keys[0]].shape[-1]
        n = self.R.randint(min(self.slices[0], depth), min(self.slices[1], depth) + 1)
        start = self.R.randint(0, depth - n + 1)
        if self._do_transform and n < depth:
            for key in self.key_iterator(d):
                d[key] = d[key].clone()
                d[key][..., :start] = 0
                d[key][..., start + n:] = 0
        return d


class RandTissueIntensityd(RandomizableTransform, MapTransform):
    """Another scanner or contrast phase: with probability ``prob``, x -> clip(x·f + o, 0, 1) for the voxels inside
    the window (x > 0), f from 1 ± ``scale``, o from ± ``offset``. Voxels at the window's low end (air, padding) stay
    0, as they would if a brighter or darker scan were windowed."""

    def __init__(self, keys, prob: float, scale: float, offset: float):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        self.scale, self.offset = scale, offset

    def __call__(self, data):
        d = dict(data)
        self.randomize(None)
        factor = self.R.uniform(1 - self.scale, 1 + self.scale)
        offset = self.R.uniform(-self.offset, self.offset)
        if self._do_transform:
            for key in self.key_iterator(d):
                x = d[key]
                d[key] = torch.where(x > 0, (x * factor + offset).clamp(0, 1), x)
        return d


def _random_part(s: FinetunePreprocessing) -> Compose:
    keys = ["image", "label"]
    slices = tuple(max(1, round(mm / s.spacing_mm[2])) for mm in s.slab_mm)
    return Compose([
        RandCropByLabelClassesd(keys, label_key="label", spatial_size=s.roi, ratios=list(s.class_ratios),
                                num_classes=len(s.class_ratios), num_samples=s.num_samples, image_key="image",
                                image_threshold=0, warn=False) if s.class_ratios else
        RandCropByPosNegLabeld(keys, label_key="label", spatial_size=s.roi, pos=s.pos, neg=s.neg,
                               num_samples=s.num_samples, image_key="image", image_threshold=0),
        *(RandFlipd(keys, prob=s.flip_prob, spatial_axis=axis) for axis in range(3)),
        RandRotate90d(keys, prob=s.rot90_prob, max_k=3),
        RandAffined(keys, prob=s.affine_prob, rotate_range=(0, 0, np.deg2rad(s.rotate_deg)), scale_range=(s.zoom,) * 3,
                    translate_range=(s.shift * s.roi[0], s.shift * s.roi[1], 0), mode=("bilinear", "nearest"),
                    padding_mode="zeros"),  # zeros: the window's low end, background
        RandScaleIntensityd("image", factors=s.intensity_factor, prob=s.scale_intensity_prob),
        RandShiftIntensityd("image", offsets=s.intensity_offset, prob=s.shift_intensity_prob),
        RandSlabd(keys, prob=s.slab_prob, slices=slices),
        RandTissueIntensityd("image", prob=s.tissue_intensity_prob, scale=s.tissue_scale, offset=s.tissue_offset),
    ])


class FinetuneTrainDataset(_EpochDataset):
    """Item i: a list of ``num_samples`` crops of case i, each {"image": float32 (1, *roi), "label": int64 (1, *roi)}.

    Collate with ``monai.data.list_data_collate`` (monai.data.DataLoader's default): a batch of B items gives
    B·num_samples crops. The crops and augmentations are a pure function of (seed, epoch, i).
    """

    def __init__(self, cases: Sequence[FinetuneCase], settings: FinetunePreprocessing, cache_dir: Path | None,
                 seed: int):
        super().__init__(cases, seed)
        self.cached = _FinetuneCached(settings, cache_dir)
        self.augment = _random_part(settings)

    def __getitem__(self, index: int) -> list[dict[str, torch.Tensor]]:
        entry = self._first_readable(index, lambda j: self.cached(self.sources[j]))
        d = {"image": torch.from_numpy(dequantize(entry["image"])),
             "label": torch.from_numpy(np.asarray(entry["label"], dtype=np.int64))}
        self.augment.set_random_state(seed=epoch_seed(self.seed, self.epoch, index))
        return [{"image": _plain(crop["image"]).float(), "label": _plain(crop["label"]).long()}
                for crop in self.augment(d)]


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor (MONAI hands back MetaTensors; the training loop needs no transform history)."""
    return t.as_tensor() if isinstance(t, MetaTensor) else torch.as_tensor(t)


class FinetuneValDataset(Dataset):
    """Item i: case i whole, pre-processed like training (no random part), to compute Dice in model space.

    {"image": MetaTensor float32 (1, I, J, K) with its RAS affine, "label": MetaTensor int64 (1, I, J, K), "name"}.
    """

    def __init__(self, cases: Sequence[FinetuneCase], settings: FinetunePreprocessing, cache_dir: Path | None):
        self.cases = list(cases)
        self.cached = _FinetuneCached(settings, cache_dir)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.cached(self.cases[index])
        affine = torch.tensor(entry["meta"]["affine"], dtype=torch.float64)
        return {"image": MetaTensor(torch.from_numpy(dequantize(entry["image"])), affine=affine),
                "label": MetaTensor(torch.from_numpy(np.asarray(entry["label"], dtype=np.int64)), affine=affine),
                "name": self.cases[index].name}


def finetune_train_dataset(cases: Sequence[FinetuneCase], settings: FinetunePreprocessing, cache_dir: Path | None,
                           seed: int = 0) -> FinetuneTrainDataset:
    """The fine-tuning training dataset of METHOD.md §9.5 (see ``FinetuneTrainDataset``)."""
    return FinetuneTrainDataset(cases, settings, cache_dir, seed)


def finetune_val_dataset(cases: Sequence[FinetuneCase], settings: FinetunePreprocessing,
                         cache_dir: Path | None) -> FinetuneValDataset:
    """The fine-tuning validation dataset: whole pre-processed cases (see ``FinetuneValDataset``)."""
    return FinetuneValDataset(cases, settings, cache_dir)


__all__ = ["ORIENTATION", "PretrainPreprocessing", "FinetunePreprocessing", "load_volume", "load_case",
           "PretrainingDataset", "FinetuneTrainDataset", "FinetuneValDataset", "pretraining_dataset",
           "finetune_train_dataset", "finetune_val_dataset", "epoch_seed", "source_files", "read_source",
           "to_metatensor"]
