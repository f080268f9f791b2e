"""geometry.labels_to_input: labels from a model grid coarser than the input come back with smooth boundaries, not
as blocks of model voxels."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from mim3d.inference.geometry import IndexBox, labels_to_input


def _grid(size, spacing) -> sitk.Image:
    image = sitk.Image(list(size), sitk.sitkUInt8)
    image.SetSpacing(spacing)
    image.SetOrigin((0.0, 0.0, 0.0))
    return image


def _centres_mm(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """x, y (mm) of each voxel centre as (K, J, I) arrays."""
    k, j, i = np.indices(tuple(reversed(image.GetSize())), dtype=np.float64)
    return i * image.GetSpacing()[0], j * image.GetSpacing()[1]


def test_a_diagonal_boundary_comes_back_smooth_not_as_blocks_of_model_voxels():
    model, fine = _grid((16, 16, 2), (6.0, 6.0, 6.0)), _grid((91, 91, 2), (1.0, 1.0, 6.0))
    x, y = _centres_mm(model)
    labels_ijk = (x + y > 45.0).astype(np.uint8).transpose(2, 1, 0)  # a diagonal boundary, sampled at 6 mm
    x_fine, y_fine = _centres_mm(fine)
    truth = x_fine + y_fine > 45.0

    mapped = labels_to_input(labels_ijk, model, fine, IndexBox.whole(fine))
    coarse = sitk.GetImageFromArray(np.ascontiguousarray(labels_ijk.transpose(2, 1, 0)))
    coarse.CopyInformation(model)
    nearest = sitk.GetArrayFromImage(sitk.Resample(coarse, fine, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    assert mapped.shape == truth.shape and mapped.dtype == np.uint8
    wrong, blocky = int((mapped.astype(bool) != truth).sum()), int((nearest.astype(bool) != truth).sum())
    assert wrong < 0.5 * blocky  # the staircase of 6 mm steps is gone
