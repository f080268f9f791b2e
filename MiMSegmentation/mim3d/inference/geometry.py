"""Where the model computes, and how its labels come back to the input grid.

Frames, stated once: SimpleITK images are LPS; an ``IndexBox`` is a box of voxels of one given image along its
(I, J, K) axes (SimpleITK index order); numpy arrays of SimpleITK images are (K, J, I).

The model grid (``model_grid``) is the input's crop, oriented RAS by ``mim3d.io.orient_ras`` (an exact permutation
and flip of the voxels; an oblique input keeps its obliqueness in the direction) and resampled to the model spacing
over the same physical extent: its voxels tile the crop edge to edge. Because both grids live in physical space,
``labels_to_input`` maps the model's labels back by resampling onto the input's own grid (identity transform), which is
exact for any orientation, permutation or oblique direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .. import io
from ..errors import BadInputError

BODY_THRESHOLD_HU = -500.0  # above air and lung, below fat (-100) and every other tissue
BODY_MIN_FRACTION = 1e-3  # a slice counts as body when at least 0.1% of its voxels are above the threshold
BODY_MARGIN_MM = 10.0  # kept around the body box: context for the windows at the skin


@dataclass(frozen=True)
class IndexBox:
    """Voxels ``start[a] <= index[a] < start[a] + size[a]`` of one image, along (I, J, K)."""

    start: tuple[int, int, int]
    size: tuple[int, int, int]

    @property
    def stop(self) -> tuple[int, int, int]:
        return tuple(s + n for s, n in zip(self.start, self.size, strict=True))

    def intersect(self, other: IndexBox) -> IndexBox | None:
        start = tuple(max(a, b) for a, b in zip(self.start, other.start, strict=True))
        stop = tuple(min(a, b) for a, b in zip(self.stop, other.stop, strict=True))
        if any(b <= a for a, b in zip(start, stop, strict=True)):
            return None
        return IndexBox(start, tuple(b - a for a, b in zip(start, stop, strict=True)))

    def slices_kji(self) -> tuple[slice, slice, slice]:
        """numpy slices of this box in a (K, J, I) array."""
        return tuple(slice(a, b) for a, b in zip(reversed(self.start), reversed(self.stop), strict=True))

    @classmethod
    def whole(cls, image: sitk.Image) -> IndexBox:
        return cls((0, 0, 0), tuple(image.GetSize()))


def body_box(image: sitk.Image) -> IndexBox | None:
    """The box of voxels above ``BODY_THRESHOLD_HU`` (ignoring slices with fewer than ``BODY_MIN_FRACTION`` of such
    voxels: noise, streaks), grown by ``BODY_MARGIN_MM``; None when nothing is above the threshold (all air).

    Leaving the air outside this box out saves its windows without changing the values the network sees: air is far
    below every CT model's intensity window, so it is 0 after windowing, which is also what the sliding window pads
    with.
    """
    body = sitk.GetArrayViewFromImage(image) > BODY_THRESHOLD_HU  # (K, J, I) bool, one byte per voxel
    start, stop = [], []
    for axis_kji in (2, 1, 0):  # I, J, K
        others = tuple(a for a in range(3) if a != axis_kji)
        counts = np.count_nonzero(body, axis=others)
        inside = np.flatnonzero(counts >= max(1.0, BODY_MIN_FRACTION * body.size / body.shape[axis_kji]))
        if inside.size == 0:
            return None
        start.append(int(inside[0]))
        stop.append(int(inside[-1]) + 1)
    margin = [math.ceil(BODY_MARGIN_MM / s) for s in image.GetSpacing()]
    start = [max(0, a - m) for a, m in zip(start, margin, strict=True)]
    stop = [min(n, b + m) for b, m, n in zip(stop, margin, image.GetSize(), strict=True)]
    return IndexBox(tuple(start), tuple(b - a for a, b in zip(start, stop, strict=True)))


def roi_box(image: sitk.Image, roi_lps: tuple[tuple[float, ...], tuple[float, ...]]) -> IndexBox | None:
    """The smallest box of ``image`` voxels holding every voxel whose centre lies in the ROI's bounding box in index
    space (exactly the voxels inside the ROI unless the image is oblique); None when the ROI misses the image.

    Args:
        roi_lps: (min corner, max corner) of an axis-aligned box in LPS mm.
    """
    low, high = np.minimum(*roi_lps), np.maximum(*roi_lps)
    corners = [(x, y, z) for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])]
    index = np.array([image.TransformPhysicalPointToContinuousIndex([float(c) for c in p]) for p in corners])
    start = np.ceil(index.min(axis=0) - 1e-6).astype(int)
    stop = np.floor(index.max(axis=0) + 1e-6).astype(int) + 1
    box = IndexBox(tuple(int(v) for v in start), tuple(int(v) for v in np.maximum(stop - start, 0)))
    return box.intersect(IndexBox.whole(image)) if min(box.size) > 0 else None


def crop(image: sitk.Image, box: IndexBox) -> sitk.Image:
    """The voxels of ``box`` as an image at their physical place (a copy of the box only)."""
    if box == IndexBox.whole(image):
        return image
    return sitk.RegionOfInterest(image, [int(n) for n in box.size], [int(s) for s in box.start])


def model_grid(image: sitk.Image, spacing_mm: tuple[float, float, float], outside_value: float) -> sitk.Image:
    """``image`` oriented RAS and linearly resampled to ``spacing_mm`` (along the RAS-oriented I, J, K) as float32.

    The new voxels tile the same physical extent (edge to edge, the last row rounded up, sampled as
    ``outside_value`` where it passes the image). Linear interpolation without smoothing, as MONAI's ``Spacingd``
    in the training pipeline does.
    """
    oriented = io.orient_ras(image)
    size = np.array(oriented.GetSize())
    spacing = np.array(oriented.GetSpacing())
    target = np.asarray(spacing_mm, dtype=float)
    direction = np.reshape(oriented.GetDirection(), (3, 3))
    new_size = np.maximum(1, np.ceil(size * spacing / target - 1e-3)).astype(int)
    corner = np.asarray(oriented.GetOrigin()) - direction @ (spacing / 2)  # outer corner of voxel (0, 0, 0)
    origin = corner + direction @ (target / 2)
    return sitk.Resample(oriented, [int(n) for n in new_size], sitk.Transform(), sitk.sitkLinear, origin.tolist(),
                         target.tolist(), direction.ravel().tolist(), float(outside_value), sitk.sitkFloat32)


def labels_to_input(labels_ijk: np.ndarray, grid: sitk.Image, image: sitk.Image, box: IndexBox) -> np.ndarray:
    """Labels (I, J, K) uint8 on the model ``grid`` -> (K, J, I) uint8 on the voxels of ``box`` of ``image``.

    Each label's indicator (0 or 255) is resampled linearly and each input voxel takes the label whose indicator is
    largest there: boundaries run smoothly between the model's voxel centres instead of as blocks of model voxels
    (nearest neighbour), where the input is finer than the model grid. One uint8 map per label at a time: about four
    bytes per box voxel at the peak. On the model's own grid this is the label map itself.
    """
    labels_kji = np.ascontiguousarray(labels_ijk.transpose(2, 1, 0))  # (K, J, I) for SimpleITK
    origin = image.TransformIndexToPhysicalPoint([int(s) for s in box.start])
    best = result = None
    for value in np.unique(labels_kji):  # ascending: on a tie the lower value (background first) wins
        indicator = sitk.GetImageFromArray((labels_kji == value).view(np.uint8) * np.uint8(255))
        indicator.CopyInformation(grid)
        score = sitk.GetArrayFromImage(sitk.Resample(indicator, [int(n) for n in box.size], sitk.Transform(),
                                                     sitk.sitkLinear, origin, image.GetSpacing(),
                                                     image.GetDirection(), 0, sitk.sitkUInt8))
        if best is None:
            best, result = score, np.full(score.shape, value, dtype=np.uint8)
        else:
            higher = score > best
            best[higher], result[higher] = score[higher], value
    return result


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """4×4 from voxel (i, j, k, 1) to LPS mm (the ``ijkToLPS`` of a .seg.nrrd)."""
    return io.LPS_TO_RAS @ io.image_to_ras(_header_only(image))[1]


def _header_only(image: sitk.Image) -> sitk.Image:
    """A 1-voxel image with ``image``'s spacing, origin and direction (so affines cost no voxel copy)."""
    tiny = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    tiny.SetSpacing(image.GetSpacing())
    tiny.SetOrigin(image.GetOrigin())
    tiny.SetDirection(image.GetDirection())
    return tiny


def check_roi(roi_lps, image: sitk.Image, name: str) -> IndexBox:
    """The ``roi_box`` of a user's ROI, or BadInputError when it misses the image."""
    box = roi_box(image, roi_lps)
    if box is None:
        corners = " to ".join(_as_ras_text(p) for p in roi_lps)
        raise BadInputError(f"{name}: the ROI from {corners} (RAS mm) does not overlap the image; give a box inside "
                            "the volume (Slicer shows RAS coordinates).")
    return box


def _as_ras_text(point_lps) -> str:
    x, y, z = point_lps
    return f"({-x:g}, {-y:g}, {z:g})"
