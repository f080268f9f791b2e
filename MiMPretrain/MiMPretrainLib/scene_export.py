"""Segmentations in the scene -> a `mim3d finetune --images --labels` data set. Qt-free; runs in Slicer and, on the
host, against real MRML from ``slicer-core``. Geometry and segment conventions are those of
``MiMSegmentationLib.mrml_bridge``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import slicer

from mim3d.labels import Label, LabelTable, from_segment_names
from MiMSegmentationLib.mrml_bridge import (
    ijk_to_ras,
    scene_rollback,
    segment_ids,
    segment_terminology,
    string_array,
    write_volume,
)

TRAINING_FILES = ("imagesTr", "labelsTr", "labels.json")


def label_table_from_segmentation(segmentation_node: Any) -> LabelTable:
    """The segments as a label table: values 1..N in segment order, names, colours 0..255, terminology if tagged.

    Raises:
        ValueError: no segments, or segment names that cannot form a table (repeated, empty, more than 255).
    """
    ids = segment_ids(segmentation_node)
    if not ids:
        raise ValueError(f"segmentation '{segmentation_node.GetName()}' has no segments; add and paint at least one.")
    segments = [segmentation_node.GetSegmentation().GetSegment(segment_id) for segment_id in ids]
    return from_segment_names([segment.GetName() for segment in segments],
                              [tuple(round(c * 255) for c in segment.GetColor()) for segment in segments],
                              [segment_terminology(segment) for segment in segments],
                              source=f"segmentation '{segmentation_node.GetName()}'")


def _training_labels(volume_node: Any, segmentation_node: Any, label_table: LabelTable) -> np.ndarray:
    """The segmentation as a (K, J, I) uint8 array of table values on ``volume_node``'s grid."""
    segmentation = segmentation_node.GetSegmentation()
    ids = segment_ids(segmentation_node)
    if not ids:
        raise ValueError(f"segmentation '{segmentation_node.GetName()}' has no segments; add and paint at least one.")
    values = []
    for segment_id in ids:
        label = label_table.by_name(segmentation.GetSegment(segment_id).GetName())
        if label is None:
            raise ValueError(f"segmentation '{segmentation_node.GetName()}': segment "
                             f"'{segmentation.GetSegment(segment_id).GetName()}' is not in the label table "
                             f"({label_table.describe()}); rename the segment or add the label.")
        values.append(label.value)
    scene = segmentation_node.GetScene()
    with scene_rollback(scene):  # the export adds the labelmap, its display node and a colour table
        exported = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, string_array(ids), exported, volume_node,
                slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
            raise RuntimeError(f"Slicer could not export segmentation '{segmentation_node.GetName()}' on the grid of "
                               f"volume '{volume_node.GetName()}'.")
        order = slicer.util.arrayFromVolume(exported)  # the i-th exported segment has value i + 1
    labels = np.array([0, *values], dtype=np.uint8)[order]
    if not labels.any():
        raise ValueError(f"segmentation '{segmentation_node.GetName()}' has no painted voxels inside volume "
                         f"'{volume_node.GetName()}'.")
    return labels


def export_training_case(volume_node: Any, segmentation_node: Any, image_path: str | Path, label_path: str | Path,
                         label_table: LabelTable) -> None:
    """Write the volume to ``image_path`` and its segmentation as a uint8 label map on exactly the same grid.

    A segment's voxels get the value of the table label with the segment's name.

    Raises:
        ValueError: no segments, no painted voxels, a segment name not in the table, or (write_volume) a volume
            without image data or an unknown suffix.
    """
    labels_kji = _training_labels(volume_node, segmentation_node, label_table)
    write_volume(volume_node, image_path)
    label_node = slicer.vtkMRMLLabelMapVolumeNode()
    label_node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras(volume_node)))
    slicer.util.updateVolumeFromArray(label_node, labels_kji)
    write_volume(label_node, label_path)


def _case_names(volume_names: Sequence[str]) -> list[str]:
    """File-safe (ASCII letters, digits, "_", "-"), unique even where case is ignored; "case" for nothing left."""
    names: list[str] = []
    for volume_name in volume_names:
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", volume_name).strip("_-") or "case"
        name, n = base, 1
        while name.lower() in {taken.lower() for taken in names}:
            n += 1
            name = f"{base}_{n}"
        names.append(name)
    return names


def label_table_of_segmentations(segmentation_nodes: Sequence[Any]) -> LabelTable:
    """One table for several segmentations (the training data's): segments by name in order of first appearance,
    numbered 1..N; colour and terminology from the first segment of that name."""
    first: dict[str, Label] = {}
    for table in map(label_table_from_segmentation, segmentation_nodes):
        for label in table:
            first.setdefault(label.name, label)
    return from_segment_names(list(first), [label.color for label in first.values()],
                              [label.terminology for label in first.values()], source="training segmentations")


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: is a file; choose a folder for the training data.")
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in TRAINING_FILES) if out_dir.exists() else []
    if others:
        raise ValueError(f"{out_dir}: already holds other files ({', '.join(others[:5])}); choose a new or empty "
                         "folder (only a previous export there is replaced).")


def export_training_data(cases: Sequence[tuple[Any, Any]], out_dir: str | Path) -> dict[str, Any]:
    """Write (volume, segmentation) pairs as a ``mim3d finetune --images --labels`` data set in ``out_dir``.

    Layout: imagesTr/<case>.nrrd, labelsTr/<case>.nrrd (same names), labels.json (segments merged by name across
    cases, values 1..N in order of first appearance). Case names come from the volume names, made file-safe and
    unique. All is written to a temporary folder beside ``out_dir`` and renamed into place; a failure leaves
    ``out_dir`` as it was. An existing ``out_dir`` must be empty or hold only a previous export, which is replaced.

    Returns:
        {"images": Path, "labels": Path, "label_table": Path, "cases": [case names in input order]}.

    Raises:
        ValueError: no cases, ``out_dir`` holds other files, or a case cannot be exported (export_training_case).
    """
    out_dir = Path(out_dir)
    if not cases:
        raise ValueError("no training cases: give at least one (volume, segmentation) pair.")
    _check_replaceable(out_dir)
    table = label_table_of_segmentations([segmentation for _, segmentation in cases])
    names = _case_names([volume.GetName() for volume, _ in cases])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    previous = staging.with_name(staging.name + "-previous")
    try:
        for folder in TRAINING_FILES[:2]:
            (staging / folder).mkdir()
        for (volume, segmentation), name in zip(cases, names, strict=True):
            export_training_case(volume, segmentation, staging / "imagesTr" / f"{name}.nrrd",
                                 staging / "labelsTr" / f"{name}.nrrd", table)
        table.save(staging / "labels.json")
        if out_dir.exists():  # moved aside first: os.replace cannot overwrite a folder on Windows
            os.replace(out_dir, previous)
        try:
            os.replace(staging, out_dir)
        except OSError:
            if previous.exists():
                os.replace(previous, out_dir)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(previous, ignore_errors=True)
    return {"images": out_dir / "imagesTr", "labels": out_dir / "labelsTr", "label_table": out_dir / "labels.json",
            "cases": names}
