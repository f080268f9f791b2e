"""The checks of MiMSegmentation's in-Slicer self-test, with no Qt, so that the host tests run them against real MRML
from the ``slicer-core`` wheel and the self-test in Slicer calls the same functions.

Each check returns a list of problems (empty: passed), so a failing self-test shows every difference at once:

    self.assertEqual(selftest_checks.selftest_segment_problems(node, volume), [])

Imports ``slicer``, numpy, SimpleITK (all in Slicer's Python) and the light mim3d modules.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import slicer

from mim3d.labels import LabelTable

from . import mrml_bridge
from .selftest_model import LABELS

# The oblique grid of the self-test CT: 20 degrees about S, spacing 1.5 × 2.0 × 2.5 mm (KJI array 24 × 28 × 20).
_ANGLE = np.deg2rad(20)
OBLIQUE_IJK_TO_RAS = np.array([[np.cos(_ANGLE) * 1.5, -np.sin(_ANGLE) * 2.0, 0, -30],
                               [np.sin(_ANGLE) * 1.5, np.cos(_ANGLE) * 2.0, 0, 12],
                               [0, 0, 2.5, -40], [0, 0, 0, 1]])
IMPORT_TABLE = LabelTable.from_dict({"labels": [{"value": 1, "name": "liver", "color": [221, 130, 101]},
                                                {"value": 2, "name": "spleen", "color": [157, 108, 162]}]})


def oblique_volume(name: str = "MiMSelfTestCT") -> Any:
    """A CT-like scalar volume on an oblique grid in ``slicer.mrmlScene``: air around a soft-tissue block."""
    array = np.full((24, 28, 20), -1000, dtype=np.int16)  # KJI
    array[4:20, 6:22, 4:16] = 40
    return slicer.util.addVolumeFromArray(array, OBLIQUE_IJK_TO_RAS, name=name)


def geometry_problems(segmentation_node: Any, volume: Any) -> list[str]:
    """The segmentation, exported on its reference geometry, must have the volume's IJK-to-RAS and dimensions."""
    scene = segmentation_node.GetScene()
    with mrml_bridge.scene_rollback(scene):  # the exported labelmap node is removed again
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        if not slicer.modules.segmentations.logic().ExportAllSegmentsToLabelmapNode(
                segmentation_node, labelmap, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
            return [f"'{segmentation_node.GetName()}': Slicer could not export it to a labelmap"]
        expected, actual = mrml_bridge.ijk_to_ras(volume), mrml_bridge.ijk_to_ras(labelmap)
        problems = []
        if not np.allclose(actual, expected, atol=1e-6):
            problems.append(f"IJK-to-RAS {actual.round(4).tolist()} differs from the volume's "
                            f"{expected.round(4).tolist()}")
        dimensions, wanted = labelmap.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions()
        if dimensions != wanted:
            problems.append(f"dimensions {dimensions} differ from the volume's {wanted}")
        return problems


def segment_problems(node: Any, volume: Any, counts: dict[str, int], table: LabelTable) -> list[str]:
    """Voxel counts by segment name, and each segment's name, colour and terminology as ``table`` gives them, and the
    volume's geometry."""
    problems = []
    found = mrml_bridge.segment_voxel_counts(node, volume)
    if found != counts:
        problems.append(f"voxel counts {found}, expected {counts}")
    segmentation = node.GetSegmentation()
    for label in table:
        segment = segmentation.GetSegment(label.name)
        if segment is None:
            problems.append(f"no segment with ID '{label.name}'")
            continue
        if segment.GetName() != label.name:
            problems.append(f"segment '{label.name}' is named '{segment.GetName()}'")
        color = [round(c * 255) for c in segment.GetColor()]
        if color != list(label.color):
            problems.append(f"segment '{label.name}' has colour {color}, expected {list(label.color)}")
        terminology = mrml_bridge.segment_terminology(segment)
        expected_type = list(label.terminology["type"]) if label.terminology else None
        found_type = list(terminology["type"]) if terminology and "type" in terminology else None
        if found_type != expected_type:
            problems.append(f"segment '{label.name}' has terminology type {found_type}, expected {expected_type}")
    return problems + geometry_problems(node, volume)


def selftest_segment_problems(node: Any, volume: Any) -> list[str]:
    """What the self-test model (``selftest_model``) must give on ``volume``: every voxel ``selftest-body`` (with its
    colour and the liver terminology), ``selftest-empty`` empty, on the volume's grid."""
    counts = {"selftest-body": int(slicer.util.arrayFromVolume(volume).size), "selftest-empty": 0}
    return segment_problems(node, volume, counts, LabelTable.from_dict(LABELS))


def labels_import_problems(work_dir: str | Path) -> list[str]:
    """Import a label file written by SimpleITK (as the worker writes it) on an oblique volume's grid: two boxes of
    known size, with the table's names and colours, exactly on the volume's grid. Files go to ``work_dir``."""
    import SimpleITK as sitk

    work_dir = Path(work_dir)
    volume = oblique_volume()
    written = sitk.ReadImage(str(mrml_bridge.write_volume(volume, work_dir / "ct.nrrd")))
    labels = np.zeros(sitk.GetArrayViewFromImage(written).shape, np.uint8)
    labels[5:10, 7:12, 5:9] = 1
    labels[12:18, 10:20, 10:15] = 2
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(written)
    sitk.WriteImage(label_image, str(work_dir / "labels.nrrd"))
    node = mrml_bridge.import_labels(work_dir / "labels.nrrd", volume, IMPORT_TABLE)
    return segment_problems(node, volume, {"liver": 5 * 5 * 4, "spleen": 6 * 10 * 5}, IMPORT_TABLE)


@contextmanager
def private_mim3d_home(folder: str | Path) -> Iterator[Path]:
    """MIM3D_HOME set to ``folder`` for the block (workers started in it inherit it), then restored, also on error,
    so a self-test's models and caches never mix with the user's."""
    saved = os.environ.get("MIM3D_HOME")
    os.environ["MIM3D_HOME"] = str(folder)
    try:
        yield Path(folder)
    finally:
        if saved is None:
            os.environ.pop("MIM3D_HOME", None)
        else:
            os.environ["MIM3D_HOME"] = saved
