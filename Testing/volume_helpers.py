"""Small real files for the data tests: volumes on chosen grids and DICOM series written with SimpleITK."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

# A rotation of 30° about the S axis, then 10° about R: an oblique grid (row-major, columns are the I, J, K axes).
_a, _b = np.radians(30), np.radians(10)
OBLIQUE = (np.array([[np.cos(_a), -np.sin(_a), 0], [np.sin(_a), np.cos(_a), 0], [0, 0, 1]])
           @ np.array([[1, 0, 0], [0, np.cos(_b), -np.sin(_b)], [0, np.sin(_b), np.cos(_b)]]))


def make_image(array_kji: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> sitk.Image:
    """A SimpleITK image from a (K, J, I) array on the given LPS grid."""
    image = sitk.GetImageFromArray(array_kji)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    if direction is not None:
        image.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    return image


def write_image(path: Path, image: sitk.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=path.name.endswith((".gz", ".nrrd", ".mha")))
    return path


def ramp(shape_kji: tuple[int, int, int], low: int = -1000, high: int = 1000) -> np.ndarray:
    """int16 values rising through the volume (no two neighbours equal along I), from ``low`` to about ``high``."""
    n = int(np.prod(shape_kji))
    return (low + (np.arange(n) * (high - low)) // n).astype(np.int16).reshape(shape_kji)


def write_dicom_series(folder: Path, uid: str, slices: int = 5, size=(32, 24)) -> list[Path]:
    """A small uncompressed CT series with SeriesInstanceUID ``uid`` (files syn<uid tail>_<k>.dcm)."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = make_image(ramp((slices, size[1], size[0])), spacing=(0.8, 0.8, 2.5), origin=(-10.0, -20.0, 30.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for k in range(slices):
        image = volume[:, :, k]
        position = "\\".join(str(x) for x in volume.TransformIndexToPhysicalPoint((0, 0, k)))
        tags = {"0020|000e": uid, "0020|000d": uid + ".1", "0008|0018": f"{uid}.{k + 10}", "0008|0060": "CT",
                "0020|0032": position, "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0013": str(k + 1),
                "0018|0050": "2.5", "0028|0030": "0.8\\0.8"}
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        files.append(folder / f"syn{uid.rsplit('.', 1)[-1]}_{k}.dcm")
        writer.SetFileName(str(files[-1]))
        writer.Execute(image)
    return files
