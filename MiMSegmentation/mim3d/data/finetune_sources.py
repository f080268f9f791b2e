"""Labelled cases for fine-tuning: an images + labels folder pair, an MSD / nnU-Net dataset.json, or .seg.nrrd files.

Rules, stated once:
- Folders: image ``X.<ext>`` pairs with label ``X.<any ext>``; an nnU-Net image ``X_0000.<ext>`` pairs with ``X.<ext>``.
  Images are found as ``discover_volumes`` finds them (DICOM series folders too, named after their folder).
- dataset.json: MSD ``"training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]`` with paths
  relative to the json's folder, or nnU-Net v2 (``"file_ending"``, no list): ``imagesTr/`` + ``labelsTr/`` beside it.
- Segmentations: for ``X.seg.nrrd`` the reference image is, in the same folder, (1) ``X.<ext>``, else (2) ``Y.<ext>``
  where X is ``Y`` followed by " segmentation", "_segmentation", "-segmentation", "_seg" or "-seg" (3D Slicer names a
  new segmentation "<volume> segmentation"), else (3) the only scan in that folder. Segment names become the label
  table: the union over all files in order of first appearance, numbered 1, 2, ...; colours and terminology from the
  first file that has the name. A segmentation grid may be a crop of the image grid (same spacing and direction,
  origin on the image lattice), as 3D Slicer saves them; it is placed onto the image grid when read.
- ``FinetuneCase.label_map`` maps source labels to table values, everything unmapped becoming background: voxel value
  -> value for label-map files (e.g. TotalSegmentator ids -> project ids), segment name -> value for .seg.nrrd files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicerio

from .. import io
from ..errors import BadInputError
from ..labels import LabelTable, from_dataset_json, from_segment_names
from .discovery import VolumeRecord, discover_volumes

_NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_SEGMENTATION_ENDINGS = (" segmentation", "_segmentation", "-segmentation", "_seg", "-seg")


@dataclass(frozen=True)
class FinetuneCase:
    """One labelled training case. ``label_map``: source label -> table value (module docstring); None = as stored."""

    image: VolumeRecord | Path
    label: Path
    name: str
    label_map: Mapping[int | str, int] | None = field(default=None, hash=False)

    @property
    def image_path(self) -> Path:
        return self.image.path if isinstance(self.image, VolumeRecord) else self.image

    @property
    def is_segmentation(self) -> bool:
        return self.label.name.lower().endswith(".seg.nrrd")


# ---- finding cases ------------------------------------------------------------------------------------------------

def _case_name(image_name: str) -> str:
    match = _NNUNET_CHANNEL.match(image_name)
    return match["case"] if match else image_name


def cases_from_folders(images_dir: str | Path, labels_dir: str | Path) -> list[FinetuneCase]:
    """Pair every image in ``images_dir`` with its label in ``labels_dir`` by name (module docstring).

    Raises:
        BadInputError: an image could not be used, an image has several nnU-Net channels, or images have no label
            (all listed).
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    discovery = discover_volumes([images_dir])
    if discovery.skipped:
        raise BadInputError(f"{images_dir}: these images cannot be used:" +
                            "".join(f"\n  {path}: {reason}" for path, reason in discovery.skipped))
    if not labels_dir.is_dir():
        raise BadInputError(f"{labels_dir}: is not a folder of labels.")
    labels = {io.volume_stem(p): p for p in sorted(labels_dir.iterdir())
              if io.volume_kind(p) and not p.name.startswith(".")}
    cases, missing, channels = [], [], {}
    for record in discovery.volumes:
        stem = record.path.name if record.kind == "dicom" else record.name
        name = stem if stem in labels else _case_name(stem)
        channels.setdefault(name, []).append(stem)
        if name in labels:
            cases.append(FinetuneCase(record, labels[name], name))
        else:
            missing.append(record.path.name)
    if extra := {n: c for n, c in channels.items() if len(c) > 1}:
        raise BadInputError(f"{images_dir}: cases with several images (nnU-Net channels) are not supported: " +
                            ", ".join(f"{n} ({', '.join(c)})" for n, c in sorted(extra.items())))
    if missing:
        raise BadInputError(f"{labels_dir}: has no label for {len(missing)} image(s) of {images_dir}: "
                            f"{', '.join(missing)}; a label is matched by the image's name (nnU-Net: X_0000 -> X).")
    return cases


def cases_from_dataset_json(path: str | Path) -> tuple[list[FinetuneCase], LabelTable]:
    """Cases and label table from an MSD or nnU-Net v2 dataset.json (module docstring).

    Raises:
        BadInputError: unreadable json, no "labels", no "training" list (MSD) or folders (nnU-Net v2), multi-channel
            images, or listed files that do not exist (all listed).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"{path}: is not a readable JSON file: {e}") from e
    table = from_dataset_json(data, f"{path}: labels")
    root = path.parent
    if "training" not in data and "file_ending" in data:  # nnU-Net v2
        return cases_from_folders(root / "imagesTr", root / "labelsTr"), table
    entries = data.get("training")
    if not isinstance(entries, list) or not entries:
        raise BadInputError(f'{path}: has no "training" list like [{{"image": "./imagesTr/x.nii.gz", '
                            '"label": "./labelsTr/x.nii.gz"}].')
    cases, missing = [], []
    for i, entry in enumerate(entries):
        image = entry.get("image") if isinstance(entry, dict) else None
        image = image[0] if isinstance(image, list) and len(image) == 1 else image
        if not isinstance(image, str) or not isinstance(entry.get("label"), str):
            raise BadInputError(f'{path}: training[{i}]: expected {{"image": "<one file>", "label": "<file>"}}, '
                                f"got {entry!r}.")
        image, label = root / image, root / entry["label"]
        missing += [str(p) for p in (image, label) if not p.exists()]
        cases.append(FinetuneCase(image, label, io.volume_stem(label)))
    if missing:
        raise BadInputError(f"{path}: lists {len(missing)} file(s) that do not exist: {', '.join(missing)}.")
    return cases, table


def _segments(path: Path) -> list[dict]:
    try:
        segments = slicerio.read_segmentation(str(path), skip_voxels=True).get("segments", [])
    except Exception as e:  # pynrrd and slicerio raise a variety of errors for a bad header
        raise BadInputError(f"{path}: could not be read as a segmentation: {e}") from e
    if not segments:
        raise BadInputError(f"{path}: has no segments; a .seg.nrrd saved by 3D Slicer names its segments.")
    return segments


def _reference_image(seg: Path) -> Path | None:
    stem = seg.name[: -len(".seg.nrrd")]
    stems = [stem] + [stem[: -len(e)] for e in _SEGMENTATION_ENDINGS if stem.lower().endswith(e) and len(stem) > len(e)]
    scans = [p for p in sorted(seg.parent.iterdir())
             if io.volume_kind(p) and not p.name.lower().endswith(".seg.nrrd") and not p.name.startswith(".")]
    for candidate in stems:
        if match := next((p for p in scans if io.volume_stem(p) == candidate), None):
            return match
    return scans[0] if len(scans) == 1 else None


def cases_from_segmentations(folder: str | Path) -> tuple[list[FinetuneCase], LabelTable]:
    """Cases from the ``*.seg.nrrd`` files under ``folder`` (recursively) with their reference images.

    Raises:
        BadInputError: no .seg.nrrd found, a file without segments, or files whose reference image is not found (all
            listed, with the rule).
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.name.lower().endswith(".seg.nrrd") and not p.name.startswith("."))
    if not files:
        raise BadInputError(f"{folder}: holds no .seg.nrrd segmentation.")
    first_seen: dict[str, dict] = {}
    per_file, missing = [], []
    for seg in files:
        segments = _segments(seg)
        for segment in segments:
            first_seen.setdefault(segment.get("name") or segment["id"], segment)
        image = _reference_image(seg)
        if image is None:
            missing.append(str(seg))
        per_file.append((seg, image, [s.get("name") or s["id"] for s in segments]))
    if missing:
        raise BadInputError(f"no reference image found for {', '.join(missing)}: put X.nii.gz (or .nrrd, .mha, ...) "
                            "beside X.seg.nrrd, or keep one scan per folder.")
    names = list(first_seen)
    colors = [tuple(round(255 * c) for c in s["color"]) if "color" in s else None for s in first_seen.values()]
    table = from_segment_names(names, colors, [s.get("terminology") for s in first_seen.values()],
                               source=f"segment names in {folder}")
    value = {name: table.by_name(name).value for name in names}
    cases = [FinetuneCase(image, seg, seg.name[: -len(".seg.nrrd")], {n: value[n] for n in seg_names})
             for seg, image, seg_names in per_file]
    return cases, table


# ---- reading and checking labels ----------------------------------------------------------------------------------

def _image_geometry(case: FinetuneCase) -> io.Geometry:
    if isinstance(case.image, VolumeRecord) and case.image.kind == "dicom":
        return io.dicom_geometry(case.image.files)
    if case.image_path.is_dir():
        series = io.list_dicom_series(case.image_path)
        if len(series) != 1:
            raise BadInputError(f"{case.image_path}: holds {len(series)} DICOM series; give exactly one.")
        return io.dicom_geometry(series[0][1])
    return io.read_geometry(case.image_path)


def _on_image_lattice(label: io.Geometry, image: io.Geometry) -> bool:
    """Same spacing and direction, origin an integer number of voxels away: a crop or extension of the image grid."""
    if not (np.allclose(label.spacing, image.spacing, rtol=1e-4) and np.allclose(label.direction, image.direction,
                                                                                  atol=1e-4)):
        return False
    steps = np.reshape(image.direction, (3, 3)).T @ np.subtract(label.origin, image.origin) / np.array(image.spacing)
    return bool(np.allclose(steps, np.round(steps), atol=1e-3))


def grid_problem(label: io.Geometry, image: io.Geometry, label_path: Path, image_name: str,
                 lattice_ok: bool = False) -> str | None:
    """A message naming every grid property where the label differs from its image, or None when they match.

    ``lattice_ok`` accepts a label grid that is a crop or extension of the image grid (.seg.nrrd files).
    """
    if lattice_ok and _on_image_lattice(label, image):
        return None
    checks = [("grid", io.Geometry.size_text, label.size == image.size),
              ("spacing", io.Geometry.spacing_text, np.allclose(label.spacing, image.spacing, rtol=1e-4)),
              ("origin", _origin_text, np.allclose(label.origin, image.origin, atol=1e-3 * max(image.spacing))),
              ("direction", _direction_text, np.allclose(label.direction, image.direction, atol=1e-4))]
    differences = [(what, show(label), show(image)) for what, show, same in checks if not same]
    if not differences:
        return None
    (what, found, expected), *rest = differences
    parts = [f"{what} {found} does not match image {image_name} {_parenthesized(expected)}"]
    parts += [f"{what} {found} does not match {_parenthesized(expected)}" for what, found, expected in rest]
    return f"{label_path}: {'; '.join(parts)}; export the label on the image grid."


def _origin_text(geometry: io.Geometry) -> str:
    return "(" + ", ".join(f"{x:.6g}" for x in geometry.origin) + ") mm"


def _direction_text(geometry: io.Geometry) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in geometry.direction) + ")"


def _parenthesized(text: str) -> str:
    return text if text.startswith("(") else f"({text})"


def _remap(voxels: np.ndarray, label_map: Mapping[int, int] | None, path: Path) -> np.ndarray:
    """Label voxels as uint8 table values; with a map, unmapped values become 0."""
    if voxels.dtype.kind == "f" and not np.array_equal(voxels, np.round(voxels)):
        raise BadInputError(f"{path}: holds non-integer values; a label map stores whole label values.")
    low, high = int(voxels.min()), int(voxels.max())
    if label_map is None:
        if low < 0 or high > 255:
            raise BadInputError(f"{path}: holds values {low}..{high}; label values must lie in 0..255 (or give a "
                                "label_map from these values to the table).")
        return voxels.astype(np.uint8)
    if voxels.dtype.kind in "iu" and low >= 0 and high < 2**16:  # the usual case: one lookup per voxel
        lookup = np.zeros(high + 1, dtype=np.uint8)
        for source, target in label_map.items():
            if 0 <= int(source) <= high:
                lookup[int(source)] = target
        return lookup[voxels]
    values, inverse = np.unique(voxels, return_inverse=True)
    targets = np.array([label_map.get(int(v), 0) for v in values], dtype=np.uint8)
    return targets[inverse].reshape(voxels.shape)


def _segmentation_image(path: Path, label_map: Mapping[str, int] | None) -> sitk.Image:
    """A .seg.nrrd as a uint8 label map of table values (later segments win where segments overlap).

    Without a map, each segment keeps its stored label value (right for a single-layer file only).
    """
    try:
        seg = slicerio.read_segmentation(str(path))
    except Exception as e:  # pynrrd and slicerio raise a variety of errors for a bad file
        raise BadInputError(f"{path}: could not be read as a segmentation: {e}") from e
    voxels = seg["voxels"]
    out = np.zeros(voxels.shape[-3:], dtype=np.uint8)  # (I, J, K)
    for segment in seg["segments"]:
        name = segment.get("name") or segment["id"]
        out[slicerio.segment_mask(seg, segment)] = label_map.get(name, 0) if label_map else segment.get("labelValue", 1)
    ijk_to_lps = np.asarray(seg["ijkToLPS"], dtype=float)
    return io.ras_to_image(out, io.LPS_TO_RAS @ ijk_to_lps)


def read_label(case: FinetuneCase, image: sitk.Image) -> sitk.Image:
    """The case's label as a uint8 SimpleITK image of table values on exactly ``image``'s grid.

    Raises:
        BadInputError: unreadable, values outside 0..255 without a map, non-integer values, or a grid that does not
            match the image (a .seg.nrrd may be a crop of it).
    """
    image_geometry = io.Geometry.of(image)
    if case.is_segmentation:
        label = _segmentation_image(case.label, case.label_map)
    else:
        label = io.read_volume(case.label, check_values=False)
    problem = grid_problem(io.Geometry.of(label), image_geometry, case.label, case.image_path.name,
                           lattice_ok=case.is_segmentation)
    if problem:
        raise BadInputError(problem)
    if case.is_segmentation:  # on the image lattice: nearest-neighbour resampling crops or pads exactly
        return sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    out = sitk.GetImageFromArray(_remap(sitk.GetArrayViewFromImage(label), None if case.is_segmentation
                                        else case.label_map, case.label))
    out.CopyInformation(image)  # equal within tolerance: make the grids identical for the transforms
    return out


def _value_problem(case: FinetuneCase, table: LabelTable) -> str | None:
    """Values (or mapped values, or segment names) of the label that the table does not hold."""
    if case.label_map is not None:
        outside = sorted({v for v in case.label_map.values() if v != 0} - set(table.values))
        return (f"{case.label}: label_map of case {case.name} maps to {', '.join(map(str, outside))}, not in the "
                f"label table ({table.describe()}).") if outside else None
    voxels = sitk.GetArrayFromImage(io.read_volume(case.label, check_values=False))  # a copy: the image is temporary
    present = {int(v) for v in np.unique(voxels)}
    outside = sorted(present - {0} - set(table.values))
    return (f"{case.label}: case {case.name} has label values {', '.join(map(str, outside))} that are not in the label "
            f"table ({table.describe()}); relabel them or add them to the table.") if outside else None


def check_cases(cases: Sequence[FinetuneCase], table: LabelTable) -> list[str]:
    """Every problem of every case, one message each: unusable images or labels, grids, values outside the table."""
    problems = []
    for case in cases:
        try:
            image = _image_geometry(case)
            io.check_geometry(image, case.image_path)
            label = io.read_geometry(case.label)
            problem = grid_problem(label, image, case.label, case.image_path.name, lattice_ok=case.is_segmentation)
            problems += [p for p in (problem, _value_problem(case, table)) if p]
        except BadInputError as e:
            problems.append(str(e))
    return problems


def validate_cases(cases: Sequence[FinetuneCase], table: LabelTable) -> None:
    """``check_cases``, raising one BadInputError that lists every problem."""
    if not cases:
        raise BadInputError("no labelled case to fine-tune on.")
    if problems := check_cases(cases, table):
        raise BadInputError(f"{len(problems)} problem(s) in the fine-tuning data:\n" + "\n".join(problems))


__all__ = ["FinetuneCase", "cases_from_folders", "cases_from_dataset_json", "cases_from_segmentations", "read_label",
           "grid_problem", "check_cases", "validate_cases"]
