"""The one home for reading and writing images and their geometry (SimpleITK).

Formats: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.seg.nrrd``), MetaImage (``.mha``, ``.mhd``) and DICOM
series folders (GDCM, any transfer syntax SimpleITK decodes, empty UIDs tolerated). Every problem with a user's file
raises ``BadInputError`` naming the file.

Frames and axis orders, stated once:
- SimpleITK works in LPS; its arrays (``GetArrayFromImage``) are indexed (K, J, I), slowest axis first.
- ``image_to_ras`` / ``ras_to_image`` give and take arrays indexed (I, J, K) with a 4×4 affine from voxel (i, j, k) to
  RAS millimetres, as MONAI and NIfTI do: ``affine_ras = diag(-1, -1, 1, 1) @ affine_lps``.
- ``write_like`` takes a SimpleITK-ordered (K, J, I) array, because its reference is a SimpleITK image.
"""

from __future__ import annotations

import gzip
import os
import struct
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import BadInputError

# Longest suffix first, so "x.seg.nrrd" is NRRD and "x.nii.gz" is NIfTI.
VOLUME_SUFFIXES = {".nii.gz": "nifti", ".nii": "nifti", ".seg.nrrd": "nrrd", ".nrrd": "nrrd", ".mha": "mha",
                   ".mhd": "mha"}
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse


def volume_suffix(path: str | Path) -> str | None:
    """The volume suffix of ``path`` (".nii.gz", ".seg.nrrd", ...), or None for another kind of file."""
    name = Path(path).name.lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s) and len(name) > len(s)), None)


def volume_kind(path: str | Path) -> str | None:
    """"nifti", "nrrd" or "mha" from the file name, or None for another kind of file."""
    suffix = volume_suffix(path)
    return VOLUME_SUFFIXES[suffix] if suffix else None


def volume_stem(path: str | Path) -> str:
    """The file name without its volume suffix: ``case_001.nii.gz`` -> ``case_001``."""
    name = Path(path).name
    suffix = volume_suffix(name)
    return name[: -len(suffix)] if suffix else name


def is_dicom_candidate(path: str | Path) -> bool:
    """A file DICOM discovery should look at: .dcm/.dicom/.ima, no suffix, or a numeric one (``CT.1.2.840.113``)."""
    suffix = Path(path).suffix.lower()
    return suffix in DICOM_SUFFIXES or suffix == "" or suffix[1:].isdigit()


@dataclass(frozen=True)
class Geometry:
    """The voxel grid of an image, in SimpleITK's terms (LPS).

    size: voxels along (I, J, K); spacing: mm along (I, J, K); origin: LPS mm of voxel (0, 0, 0); direction: row-major
    3×3 whose columns are the I, J, K axes in LPS; components: values per voxel (1 for a scalar image).
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int = 1

    @classmethod
    def of(cls, image: sitk.Image | sitk.ImageFileReader) -> Geometry:
        """The geometry of a SimpleITK image, or of a reader after ``ReadImageInformation``."""
        components = (image.GetNumberOfComponentsPerPixel() if isinstance(image, sitk.Image)
                      else image.GetNumberOfComponents())
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()), components)

    @property
    def dimension(self) -> int:
        return len(self.size)

    def size_text(self) -> str:
        return "×".join(str(s) for s in self.size)

    def spacing_text(self) -> str:
        return "×".join(f"{s:.4g}" for s in self.spacing) + " mm"


def check_geometry(geometry: Geometry, path: str | Path) -> None:
    """Raise BadInputError unless the grid is a 3-D scalar volume with more than one voxel along every axis."""
    if geometry.dimension != 3:
        raise BadInputError(f"{path}: is a {geometry.dimension}-D image (size {geometry.size_text()}); "
                            "a CT volume must be 3-D.")
    if geometry.components != 1:
        raise BadInputError(f"{path}: has {geometry.components} values per voxel (a vector, colour or multi-channel "
                            "image); a CT volume must have one value per voxel.")
    if min(geometry.size) < 2:
        raise BadInputError(f"{path}: is a single slice (size {geometry.size_text()}); a CT volume needs at least 2 "
                            "voxels along every axis.")


def _unreadable(path: str | Path, error: Exception, what: str = "image") -> BadInputError:
    last = next((line.strip() for line in reversed(str(error).strip().splitlines()) if line.strip()), "")
    return BadInputError(f"{path}: could not be read as an {what} (unreadable, truncated or not an image file): "
                         f"{last}")


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Bytes a complete NIfTI-1/2 file holds (offset of the voxels + voxel bytes), None if not a NIfTI header."""
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", header[:4])[0]
        if sizeof_hdr == 348 and len(header) >= 112:  # NIfTI-1: dim int16[8] @40, bitpix @72, vox_offset float @108
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
        elif sizeof_hdr == 540 and len(header) >= 176:  # NIfTI-2: bitpix @14, dim int64[8] @16, vox_offset @168
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
        else:
            continue
        count = int(np.prod([max(d, 1) for d in dims[1: 1 + max(0, min(dims[0], 7))]], dtype=np.int64))
        return max(offset, sizeof_hdr) + count * bitpix // 8
    return None


def _gzip_length(path: Path) -> int | None:
    """Uncompressed length of a gzip file, or None when the stream ends early (a truncated file)."""
    total, inflater = 0, zlib.decompressobj(wbits=31)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            while chunk:
                total += len(inflater.decompress(chunk))
                chunk = inflater.unused_data if inflater.eof else b""
                if inflater.eof and chunk:  # another gzip member follows
                    inflater = zlib.decompressobj(wbits=31)
    return total if inflater.eof else None


def _check_nifti_complete(path: Path) -> None:
    """SimpleITK pads a truncated NIfTI with zeros without a word, so compare its length with its header."""
    compressed = path.name.lower().endswith(".gz")
    with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
        expected = _nifti_expected_bytes(f.read(544))
    if expected is None:
        return  # not NIfTI after all: SimpleITK reported no error, so leave it to the reader
    if not compressed:
        actual = path.stat().st_size
    else:
        with open(path, "rb") as f:  # a gzip trailer ends with the length mod 2**32: exact for a whole file
            f.seek(-4, os.SEEK_END)
            trailer = struct.unpack("<I", f.read(4))[0]
        actual = expected if trailer == expected % 2**32 else _gzip_length(path)
    if actual is None or actual < expected:
        found = "a compressed stream that ends early" if actual is None else f"{actual} bytes"
        raise BadInputError(f"{path}: is truncated: its header describes {expected} bytes, the file holds {found}; "
                            "copy or export it again.")


def read_geometry(path: str | Path) -> Geometry:
    """The geometry of an image file from its header only (fast), after checking a NIfTI file is complete.

    Raises:
        BadInputError: the file is missing, unreadable, truncated (NIfTI) or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such file.")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        if volume_kind(path) == "nifti":
            _check_nifti_complete(path)
    except (RuntimeError, OSError, EOFError, zlib.error, struct.error) as e:
        raise _unreadable(path, e) from e
    return Geometry.of(reader)


def list_dicom_series(folder: str | Path) -> list[tuple[str, list[Path]]]:
    """Every DICOM series under ``folder`` (recursively): (series instance UID, its files sorted by position).

    The UID may be "" (tolerated); files of one series are expected in one folder, so the same UID in
    two folders gives two entries. Only files that look like DICOM are scanned (see ``is_dicom_candidate``).
    """
    series = []
    for directory, subdirs, files in os.walk(folder):
        subdirs.sort()
        if any(is_dicom_candidate(f) for f in files):
            series += dicom_series_in(Path(directory))
    return series


def dicom_series_in(directory: Path) -> list[tuple[str, list[Path]]]:
    """The DICOM series whose files lie directly in ``directory`` (not below it), as ``list_dicom_series``."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns on stderr for every folder without a series
    try:
        return [(uid, [Path(n) for n in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), uid)])
                for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(directory))]
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def dicom_geometry(files: Sequence[Path]) -> Geometry:
    """Geometry of a DICOM series from the headers of its first and last file (slice spacing from their positions)."""
    try:
        first, last = (_header(files[i]) for i in (0, -1))
    except RuntimeError as e:
        raise _unreadable(files[0].parent, e, "DICOM series") from e
    if len(files) == 1:  # a single (possibly multi-frame) file
        return Geometry.of(first)
    normal = np.reshape(first.GetDirection(), (3, 3))[:, 2]
    step = abs(float(np.dot(np.subtract(last.GetOrigin(), first.GetOrigin()), normal))) / (len(files) - 1)
    size = (*first.GetSize()[:2], len(files))
    spacing = (*first.GetSpacing()[:2], step)
    return Geometry(size, spacing, tuple(first.GetOrigin()), tuple(first.GetDirection()), first.GetNumberOfComponents())


def _header(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def read_dicom_series(files: Sequence[Path], name: str | Path) -> sitk.Image:
    """Read one DICOM series (files sorted by position, as ``list_dicom_series`` gives them); ``name`` for messages."""
    try:
        image = sitk.ReadImage([str(f) for f in files])
    except RuntimeError as e:
        raise _unreadable(name, e, "DICOM series") from e
    check_geometry(Geometry.of(image), name)
    return image


def read_volume(path: str | Path, check_values: bool = True) -> sitk.Image:
    """Read a volume file or a folder holding exactly one DICOM series, as a 3-D scalar SimpleITK image (LPS).

    Args:
        path: a .nii/.nii.gz/.nrrd/.seg.nrrd/.mha/.mhd file, or a DICOM series folder (searched recursively).
        check_values: also refuse degenerate voxel values (all one value, NaN/inf); off for label maps, which may
            legitimately be empty.

    Raises:
        BadInputError: unreadable, truncated, not 3-D (2-D, 4-D, vector), a single slice, degenerate values; a folder
            with no DICOM series or several.
    """
    path = Path(path)
    if path.is_dir():
        series = list_dicom_series(path)
        if len(series) != 1:
            found = "no DICOM series" if not series else f"{len(series)} DICOM series (" + ", ".join(
                f"'{uid}' in {files[0].parent}: {len(files)} files" for uid, files in series) + ")"
            raise BadInputError(f"{path}: holds {found}; give a folder with exactly one series.")
        image = read_dicom_series(series[0][1], path)
    else:
        check_geometry(read_geometry(path), path)
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as e:
            raise _unreadable(path, e) from e
    if check_values:
        check_volume(image, path)
    return image


def check_volume(image: sitk.Image, path: str | Path) -> None:
    """Raise BadInputError unless ``image`` is a usable volume: geometry as ``check_geometry``, finite, not constant."""
    check_geometry(Geometry.of(image), path)
    voxels = sitk.GetArrayViewFromImage(image)
    if voxels.dtype.kind == "f" and not np.isfinite(voxels).all():
        bad = int(np.count_nonzero(~np.isfinite(voxels)))
        raise BadInputError(f"{path}: has {bad} NaN or infinite voxels; a CT volume must hold finite HU values.")
    low, high = voxels.min(), voxels.max()
    if low == high:
        raise BadInputError(f"{path}: every voxel has the value {low.item():g}; the volume holds no image.")


def orient_ras(image: sitk.Image) -> sitk.Image:
    """The same voxels with axes permuted and flipped so that I, J, K increase towards R, A, S (MONAI's "RAS").

    An oblique image gets the closest such axes and keeps its obliqueness in the direction; nothing is resampled.
    """
    return sitk.DICOMOrient(image, "RAS")  # letters name the direction each axis increases towards (DICOM style)


def _affine_lps(image: sitk.Image) -> np.ndarray:
    """4×4 from voxel (i, j, k, 1) to LPS mm."""
    affine = np.eye(4)
    affine[:3, :3] = np.reshape(image.GetDirection(), (3, 3)) @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return affine


def image_to_ras(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(array (I, J, K), affine 4×4 voxel (i, j, k, 1) -> RAS mm) of a 3-D scalar image; the array is a copy."""
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (K, J, I) -> (I, J, K)
    return array, LPS_TO_RAS @ _affine_lps(image)


def ras_to_image(array_ijk: np.ndarray, affine_ras: np.ndarray) -> sitk.Image:
    """Inverse of ``image_to_ras``: an (I, J, K) array on the grid of a voxel -> RAS affine, as a SimpleITK image."""
    affine_lps = LPS_TO_RAS @ np.asarray(affine_ras, dtype=float)
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array_ijk).transpose(2, 1, 0)))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((affine_lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(affine_lps[:3, 3].tolist())
    return image


def write_like(array_kji: np.ndarray, reference: sitk.Image, path: str | Path) -> Path:
    """Write a (K, J, I) array on the exact grid of ``reference`` (size, spacing, origin, direction), atomically.

    The file appears complete or not at all: it is written as ``<name>.tmp-XXXX<suffix>`` in the same folder (the
    suffix tells SimpleITK the format) and renamed. ``.mhd`` is refused: its separate data file cannot be renamed
    along with it.

    Raises:
        BadInputError: the array's shape is not the reference's size reversed, or the suffix is not a volume format.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if suffix is None or suffix == ".mhd":
        raise BadInputError(f"{path}: cannot write this format; use .nii.gz, .nrrd, .seg.nrrd or .mha.")
    expected = tuple(reversed(reference.GetSize()))
    if tuple(array_kji.shape) != expected:
        raise BadInputError(f"{path}: array of shape {tuple(array_kji.shape)} does not fit the reference grid "
                            f"{'×'.join(map(str, reference.GetSize()))} (expected shape {expected} in K, J, I order).")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_kji))
    image.CopyInformation(reference)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name[: -len(suffix)]}.tmp-", suffix=suffix)
    os.close(fd)
    try:
        sitk.WriteImage(image, tmp, useCompression=suffix in (".nii.gz", ".nrrd", ".seg.nrrd", ".mha"))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


__all__ = ["VOLUME_SUFFIXES", "Geometry", "volume_kind", "volume_suffix", "volume_stem", "is_dicom_candidate",
           "read_geometry", "dicom_geometry", "check_geometry", "list_dicom_series", "dicom_series_in",
           "read_dicom_series", "read_volume", "check_volume", "orient_ras", "image_to_ras", "ras_to_image",
           "write_like"]
