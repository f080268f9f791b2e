"""Find the scans under folders: NIfTI, NRRD, MetaImage files and DICOM series, recursively, from headers only.

Rules:
- A file counts by its suffix (``mim3d.io.VOLUME_SUFFIXES``); ``.seg.nrrd`` files are segmentations, not scans, and
  are skipped with that reason. Hidden files (name starting with ".", e.g. macOS ``._x.nii.gz``) are ignored.
- DICOM: each folder holding DICOM-looking files (``mim3d.io.is_dicom_candidate``) is scanned with GDCM; every series
  in it (grouped by SeriesInstanceUID, empty UIDs included) becomes one record. A ``.dcm``/``.dicom``/``.ima`` file in
  no series is reported; other files are ignored silently.
- 2-D, 4-D, vector and single-slice images and truncated NIfTI files are caught here from the headers and skipped
  with the reason; checks that need the voxels (all one value, NaN) happen when a volume is read
  (``VolumeRecord.read``).
"""

from __future__ import annotations

import os
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from .. import io
from ..errors import BadInputError


@dataclass(frozen=True)
class VolumeRecord:
    """One scan found on disk, described from its header.

    path: the file, or for DICOM the folder holding the series; kind: "nifti", "nrrd", "mha" or "dicom";
    size: voxels along (I, J, K); spacing: mm along (I, J, K); bytes: on disk, all files together;
    series_id: DICOM SeriesInstanceUID ("" when the files leave it empty), None for other kinds;
    files: every file that holds the volume (the file itself, a .mhd and its data file, DICOM slices in position
    order).
    """

    path: Path
    kind: str
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    bytes: int
    series_id: str | None = None
    files: tuple[Path, ...] = field(default=(), repr=False)

    @property
    def name(self) -> str:
        """A short name for logs and case names: the file name without suffix, or the DICOM folder and series."""
        if self.kind != "dicom":
            return io.volume_stem(self.path)
        return f"{self.path.name}:{self.series_id}" if self.series_id else self.path.name

    def read(self) -> sitk.Image:
        """The volume as a 3-D SimpleITK image (LPS), checked with ``mim3d.io.check_volume``.

        Raises:
            BadInputError: the files changed or broke since discovery, or the voxels are degenerate (constant, NaN).
        """
        if self.kind != "dicom":
            return io.read_volume(self.path)
        image = io.read_dicom_series(self.files, self.path)
        io.check_volume(image, self.path)
        return image


@dataclass
class Discovery:
    """What ``discover_volumes`` found: the usable volumes and the skipped files, each with the reason."""

    folders: list[Path]
    volumes: list[VolumeRecord]
    skipped: list[tuple[Path, str]]

    def summary(self) -> dict:
        """JSON-ready numbers: count, total bytes, volumes per format, spacing per axis (mm), skipped with reasons."""
        spacings = list(zip(*(v.spacing for v in self.volumes), strict=True))
        return {
            "count": len(self.volumes),
            "total_bytes": sum(v.bytes for v in self.volumes),
            "formats": dict(sorted(Counter(v.kind for v in self.volumes).items())),
            "spacing_mm": {"min": [min(s) for s in spacings], "median": [statistics.median(s) for s in spacings],
                           "max": [max(s) for s in spacings]},
            "skipped": [{"path": str(path), "reason": reason} for path, reason in self.skipped],
        }

    def describe(self) -> str:
        """A few lines for people: counts, size, spacing range, then each skipped file and why."""
        s = self.summary()
        formats = ", ".join(f"{kind} {n}" for kind, n in s["formats"].items())
        spacing = {k: "×".join(f"{x:.3g}" for x in v) for k, v in s["spacing_mm"].items()}
        lines = [f"{s['count']} volumes, {_human_bytes(s['total_bytes'])} ({formats}) in "
                 f"{', '.join(map(str, self.folders))}",
                 f"spacing (mm, I×J×K): min {spacing['min']}, median {spacing['median']}, max {spacing['max']}"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)}:")
            lines += [f"  {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _reason(error: BadInputError, path: Path) -> str:
    """The message without its leading "path: ", for a skip list that shows the path already."""
    return str(error).removeprefix(f"{path}: ")


def _mhd_data_files(header: Path) -> list[Path]:
    """The data file a .mhd header names (ElementDataFile), when it is one plain file beside it."""
    text = header.read_text(encoding="utf-8", errors="replace")
    match = re.search(r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", text, re.MULTILINE)
    data = header.parent / match.group(1) if match else None
    return [data] if data is not None and data.is_file() else []


def _file_record(path: Path) -> VolumeRecord:
    geometry = io.read_geometry(path)
    io.check_geometry(geometry, path)
    files = [path] + (_mhd_data_files(path) if path.name.lower().endswith(".mhd") else [])
    return VolumeRecord(path, io.volume_kind(path), geometry.size, geometry.spacing,
                        sum(f.stat().st_size for f in files), files=tuple(files))


def _dicom_records(directory: Path, names: list[str]) -> tuple[list[VolumeRecord], list[tuple[Path, str]]]:
    records, skipped, in_series = [], [], set()
    for uid, files in io.dicom_series_in(directory):
        in_series.update(f.name for f in files)
        try:
            geometry = io.dicom_geometry(files)
            io.check_geometry(geometry, directory)
        except BadInputError as e:
            skipped.append((directory, f"DICOM series '{uid}': {_reason(e, directory)}"))
            continue
        records.append(VolumeRecord(directory, "dicom", geometry.size, geometry.spacing,
                                    sum(f.stat().st_size for f in files), uid, tuple(files)))
    skipped += [(directory / n, "is not a readable DICOM file") for n in names
                if n not in in_series and n.lower().endswith(io.DICOM_SUFFIXES)]
    return records, skipped


def _scan_directory(directory: Path, names: list[str]) -> tuple[list[VolumeRecord], list[tuple[Path, str]]]:
    records, skipped = [], []
    for name in names:
        path = directory / name
        if io.volume_kind(name) is None:
            continue
        if name.lower().endswith(".seg.nrrd"):
            skipped.append((path, "is a segmentation (.seg.nrrd), not a scan"))
            continue
        try:
            records.append(_file_record(path))
        except BadInputError as e:
            skipped.append((path, _reason(e, path)))
    if any(io.is_dicom_candidate(n) for n in names):
        dicom, dicom_skipped = _dicom_records(directory, names)
        records += dicom
        skipped += dicom_skipped
    return records, skipped


def discover_volumes(folders: Sequence[str | Path]) -> Discovery:
    """Every usable scan under ``folders`` (recursively), in a stable order, with what was skipped and why.

    Raises:
        BadInputError: a folder does not exist, or no usable volume was found at all (the message names the folders
            and lists the skipped files with their reasons).
    """
    folders = [Path(f) for f in folders]
    if not folders:
        raise BadInputError("no data folder given; give at least one folder of scans.")
    volumes, skipped, seen = [], [], set()
    for folder in folders:
        if not folder.is_dir():
            raise BadInputError(f"{folder}: is not a folder; give a folder of scans (NIfTI, NRRD, MHA or DICOM).")
        for directory, subdirs, files in os.walk(folder):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            if (key := Path(directory).resolve()) in seen:  # the same folder given twice, or nested
                continue
            seen.add(key)
            found, lost = _scan_directory(Path(directory), sorted(f for f in files if not f.startswith(".")))
            volumes += found
            skipped += lost
    if not volumes:
        where = ", ".join(map(str, folders))
        why = "".join(f"\n  {path}: {reason}" for path, reason in skipped)
        raise BadInputError(f"{where}: no usable volume found (searched recursively for .nii, .nii.gz, .nrrd, .mha, "
                            f".mhd files and DICOM series)" + (f"; skipped:{why}" if why else "."))
    return Discovery(folders, volumes, skipped)


__all__ = ["VolumeRecord", "Discovery", "discover_volumes"]
