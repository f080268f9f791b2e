"""The Qt-free bridge between MRML nodes and the files of the mim3d worker and trainer.

Runs inside 3D Slicer and, on the host, against the ``slicer-core`` wheel (real MRML, no application). Imports only
``slicer``, ``vtk``, numpy, the standard library and ``mim3d.labels``.

Conventions, stated once:
- Geometry: files carry a volume node's own IJK-to-RAS (LPS on disk); a parent transform is never hardened into a
  file. A segmentation made from a volume sits under that volume's parent transform, so it overlays the volume.
- Segments: one per label of the table, segment ID = name = label name, colour and label value from the table, the
  terminology as the segment's "TerminologyEntry" tag (the tag ``vtkSegment.SetTerminology`` writes, on every Slicer;
  none for a label without terminology).
- Temporary nodes never outlive a call: readers and writers work on nodes kept out of the scene, and whatever a call
  adds to the scene and does not return is removed, also when it fails.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk

from mim3d.labels import Label, LabelTable

# Equal to mim3d.inference.output.TERMINOLOGY_CONTEXT (not imported: that module needs SimpleITK), so segments made
# here and segments of our .seg.nrrd files carry the same terminology entry.
TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
# Slicer's default context for anatomic regions; used when a label gives a region but no context for it.
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
WRITE_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha")
# A label file lies on the reference grid when every voxel centre is this close to the reference's (in voxels of the
# smallest spacing); covers the float32 rounding of NIfTI headers, refuses any real shift, flip or rotation.
GRID_TOLERANCE_VOXELS = 0.01


# ---- volumes ------------------------------------------------------------------------------------------------------

def write_volume(volume_node: Any, path: str | Path) -> Path:
    """Write ``volume_node``'s voxels on its exact grid (IJK-to-RAS, LPS on disk) to ``path`` (.nrrd, .nii.gz, ...).

    Uses a storage node kept out of the scene: the volume's own storage node and the scene are unchanged.

    Raises:
        ValueError: the node has no image data, or the suffix is not one of WRITE_SUFFIXES.
        OSError: the file could not be written.
    """
    path = Path(path)
    if volume_node.GetImageData() is None:
        raise ValueError(f"volume '{volume_node.GetName()}' has no image data; load or create its voxels first.")
    if not path.name.lower().endswith(WRITE_SUFFIXES):
        raise ValueError(f"{path}: cannot write a volume in this format; use {', '.join(WRITE_SUFFIXES)}.")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.WriteData(volume_node):
        raise OSError(f"{path}: could not write volume '{volume_node.GetName()}'; check that the folder exists and "
                      "is writable.")
    return path


def ijk_to_ras(volume_node: Any) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def _size_text(volume_node: Any) -> str:
    return "×".join(str(n) for n in volume_node.GetImageData().GetDimensions())


def _in_reference_order(path: Path, labels: Any, reference_volume: Any) -> np.ndarray:
    """The voxels of ``labels`` (read from ``path``) as a (K, J, I) array in ``reference_volume``'s IJK order.

    The file must hold the reference's voxel lattice. Its axes may be stored reversed or permuted (Slicer's reader
    reverses K of a left-handed grid); that is undone by reindexing, never by interpolation.

    Raises:
        ValueError: another size, or voxels more than GRID_TOLERANCE_VOXELS away from the reference's.
    """
    file_dims, reference_dims = labels.GetImageData().GetDimensions(), reference_volume.GetImageData().GetDimensions()
    file_matrix, reference_matrix = ijk_to_ras(labels), ijk_to_ras(reference_volume)
    axes = np.round(np.linalg.solve(reference_matrix, file_matrix)[:3, :3])  # file IJK axis -> reference IJK axis
    if not (set(np.abs(axes).ravel()) <= {0, 1} and (np.abs(axes).sum(0) == 1).all()
            and (np.abs(axes).sum(1) == 1).all()):
        axes = np.eye(3)  # not a reordering of axes: compare as stored, the offset check below refuses it
    if tuple(np.abs(axes) @ file_dims) != reference_dims:
        raise ValueError(f"{path}: grid {_size_text(labels)} (I×J×K) does not match volume "
                         f"'{reference_volume.GetName()}' ({_size_text(reference_volume)}); write the labels on the "
                         "volume's grid.")
    shift = np.where(axes.sum(1) < 0, np.array(reference_dims) - 1, 0)
    corners = np.array([[i, j, k] for i in (0, file_dims[0] - 1) for j in (0, file_dims[1] - 1)
                        for k in (0, file_dims[2] - 1)], dtype=float)
    file_ras = corners @ file_matrix[:3, :3].T + file_matrix[:3, 3]
    reference_ras = (corners @ axes.T + shift) @ reference_matrix[:3, :3].T + reference_matrix[:3, 3]
    offset_mm = np.linalg.norm(file_ras - reference_ras, axis=1).max()
    allowed_mm = GRID_TOLERANCE_VOXELS * min(reference_volume.GetSpacing())
    if offset_mm > allowed_mm:
        raise ValueError(f"{path}: its voxels lie up to {offset_mm:.4g} mm from those of volume "
                         f"'{reference_volume.GetName()}' (allowed {allowed_mm:.3g} mm): same size, different "
                         "position or orientation; write the labels on the volume's grid.")
    array_ijk = slicer.util.arrayFromVolume(labels).transpose(2, 1, 0).transpose(np.abs(axes).argmax(1))
    flipped = tuple(np.flatnonzero(axes.sum(1) < 0))
    return np.ascontiguousarray(np.flip(array_ijk, flipped).transpose(2, 1, 0))


def _read_labelmap(path: Path, reference_volume: Any, label_table: LabelTable) -> Any:
    """The label file as a uint8 labelmap node outside the scene, exactly on ``reference_volume``'s grid.

    Raises:
        ValueError: (naming the file) missing or unreadable, another grid, or values not in the table.
    """
    if reference_volume.GetImageData() is None:
        raise ValueError(f"volume '{reference_volume.GetName()}' has no image data to place {path} on.")
    if not path.is_file():
        raise ValueError(f"{path}: no such file.")
    labels = slicer.vtkMRMLLabelMapVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetSingleFile(True)  # never gather numbered neighbours (case_001, case_002, ...) into a series
    if not storage.ReadData(labels) or labels.GetImageData() is None:
        raise ValueError(f"{path}: is not a readable label map (NRRD, NIfTI or MetaImage).")
    array = _in_reference_order(path, labels, reference_volume)
    unknown = sorted(set(np.unique(array).tolist()) - {0, *label_table.values})
    if unknown:
        shown = ", ".join(str(v) for v in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        raise ValueError(f"{path}: holds values {shown} that are not in the label table "
                         f"({label_table.describe()}); the labels and the table do not belong together.")
    # Within GRID_TOLERANCE_VOXELS: take the reference's matrix so the import never resamples.
    labels.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras(reference_volume)))
    slicer.util.updateVolumeFromArray(labels, array.astype(np.uint8))
    return labels


# ---- scene housekeeping -------------------------------------------------------------------------------------------

@contextmanager
def scene_rollback(scene: Any, keep_on_success: bool = False) -> Iterator[None]:
    """Remove the nodes the block adds to ``scene``: always, or with ``keep_on_success`` only when it raises."""
    before = {node.GetID() for node in scene.GetNodes()}
    succeeded = False
    try:
        yield
        succeeded = True
    finally:
        if not (succeeded and keep_on_success):
            for node in reversed([node for node in scene.GetNodes() if node.GetID() not in before]):
                if scene.IsNodePresent(node):
                    scene.RemoveNode(node)


def string_array(texts: Sequence[str]) -> Any:
    array = vtk.vtkStringArray()
    for text in texts:
        array.InsertNextValue(text)
    return array


def segment_ids(segmentation_node: Any) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


# ---- terminology --------------------------------------------------------------------------------------------------

def _code_text(label: Label, key: str) -> str:
    code = label.terminology.get(key)
    if code is None:
        return "^^"
    if (not isinstance(code, list | tuple) or len(code) != 3
            or not all(isinstance(part, str) and "~" not in part and "^" not in part for part in code)):
        raise ValueError(f"label '{label.name}': terminology.{key}: {code!r} is not a code "
                         '["scheme", "value", "meaning"] (texts without "~" or "^").')
    return "^".join(code)


def _context_text(label: Label, key: str, default: str) -> str:
    context = label.terminology.get(key, default)
    if not isinstance(context, str) or "~" in context:
        raise ValueError(f"label '{label.name}': terminology.{key}: {context!r} is not a context name (a text "
                         'without "~").')
    return context


def terminology_entry(label: Label) -> str | None:
    """Slicer's serialized terminology of ``label``, or None when it has no terminology category and type.

    Seven "~"-separated fields, codes as "scheme^value^meaning": context, category, type, type modifier, anatomic
    context, anatomic region, region modifier; the keys are slicerio's (``contextName``, ``category``, ``type``,
    ``typeModifier``, ``anatomicContextName``, ``anatomicRegion``, ``anatomicRegionModifier``). The context defaults
    to TERMINOLOGY_CONTEXT; the anatomic context to ANATOMIC_CONTEXT when a region is given, else empty (as slicerio
    writes it).

    Raises:
        ValueError: a code is not three texts, or a text holds a separator ("~", "^").
    """
    terminology = label.terminology or {}
    if "category" not in terminology or "type" not in terminology:
        return None
    anatomic_default = ANATOMIC_CONTEXT if "anatomicRegion" in terminology else ""
    return "~".join([_context_text(label, "contextName", TERMINOLOGY_CONTEXT), _code_text(label, "category"),
                     _code_text(label, "type"), _code_text(label, "typeModifier"),
                     _context_text(label, "anatomicContextName", anatomic_default), _code_text(label, "anatomicRegion"),
                     _code_text(label, "anatomicRegionModifier")])


def _terminology_from_entry(entry: str) -> dict[str, Any] | None:
    """The terminology dict of a serialized entry, as slicerio's reader gives it; None if it names no type."""
    fields = entry.split("~")
    if len(fields) != 7:
        return None
    context, category, type_, type_modifier, anatomic_context, region, region_modifier = fields
    codes = {"category": category.split("^"), "type": type_.split("^")}
    if not all(len(code) == 3 and code[1] for code in codes.values()):
        return None
    terminology: dict[str, Any] = {"contextName": context, **codes}
    if any(type_modifier.split("^")):
        terminology["typeModifier"] = type_modifier.split("^")
    if anatomic_context:
        terminology["anatomicContextName"] = anatomic_context
    if any(region.split("^")):
        terminology["anatomicRegion"] = region.split("^")
        if any(region_modifier.split("^")):
            terminology["anatomicRegionModifier"] = region_modifier.split("^")
    return terminology


def segment_terminology(segment: Any) -> dict[str, Any] | None:
    entry = vtk.reference("")
    if not segment.GetTag(segment.GetTerminologyEntryTagName(), entry):
        return None
    return _terminology_from_entry(str(entry))


# ---- label file -> segmentation -----------------------------------------------------------------------------------

def import_labels(label_path: str | Path, reference_volume: Any, label_table: LabelTable,
                  segmentation_node: Any = None, name: str | None = None, show_3d: bool = False) -> Any:
    """Fill a segmentation with the labels of a worker's label map written on ``reference_volume``'s grid.

    Every label of ``label_table`` becomes a segment (empty when absent from the file): ID and name = label name,
    table colour, label value = table value, its terminology entry. The segmentation gets ``reference_volume`` as its
    reference geometry and parent transform, default display nodes, and a closed surface when ``show_3d``.
    ``segmentation_node`` is emptied and refilled (same node, where it is in the subject hierarchy); without it a new
    node is added, named ``name`` (default "<volume name> segmentation"), beside the volume in the subject hierarchy
    (in its study, when it has one). The file is fully checked before any node is touched; on failure a node added by
    this call is removed again.

    Raises:
        ValueError: (naming the file) missing or unreadable file, a grid other than the volume's, values not in the
            table; or a label whose terminology is malformed.
    """
    label_path = Path(label_path)
    labels = _read_labelmap(label_path, reference_volume, label_table)
    entries = {label.name: terminology_entry(label) for label in label_table}
    scene = reference_volume.GetScene()
    with scene_rollback(scene, keep_on_success=True):
        node = segmentation_node
        if node is None:
            name = name or f"{reference_volume.GetName()} segmentation"
            node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            _place_beside(node, reference_volume)
        _fill_segments(node, labels, reference_volume, label_table, entries, label_path)
        node.CreateDefaultDisplayNodes()
        if show_3d:
            node.CreateClosedSurfaceRepresentation()
    return node


def _place_beside(node: Any, volume: Any) -> None:
    """Give ``node`` the subject-hierarchy parent of ``volume`` (Slicer creates data nodes' items as they are added;
    a bare MRML scene does not, so a missing item is created here)."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(volume.GetScene())
    volume_item = hierarchy.GetItemByDataNode(volume) if hierarchy else 0
    if not volume_item:
        return
    parent = hierarchy.GetItemParent(volume_item)
    item = hierarchy.GetItemByDataNode(node) or hierarchy.CreateItem(parent, node)
    hierarchy.SetItemParent(item, parent)


def _fill_segments(node: Any, labels: Any, reference_volume: Any, label_table: LabelTable,
                   entries: dict[str, str | None], label_path: Path) -> None:
    segmentation = node.GetSegmentation()
    segmentation.RemoveAllSegments()
    segmentation.SetSourceRepresentationName(
        slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName())
    # The labelmap (outside the scene) has no parent transform: import untransformed, then move the segmentation
    # under the volume's transform; the reference geometry is set last, when both share that transform.
    node.SetAndObserveTransformNodeID(None)
    for label in label_table:
        segmentation.AddEmptySegment(label.name, label.name, [c / 255 for c in label.color])
    # Label value v goes to the (v-1)-th ID; "" for the values between table values, which the check kept out.
    ids = string_array([label.name if (label := label_table.by_value(value)) else ""
                         for value in range(1, max(label_table.values) + 1)])
    if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labels, node, ids):
        raise RuntimeError(f"{label_path}: Slicer could not import the label map into '{node.GetName()}'.")
    node.SetAndObserveTransformNodeID(reference_volume.GetTransformNodeID())
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    for label in label_table:
        segment = segmentation.GetSegment(label.name)
        segment.SetNameAutoGenerated(False)  # keep our names and colours when the terminology is edited
        segment.SetColorAutoGenerated(False)
        if entries[label.name]:
            segment.SetTag(segment.GetTerminologyEntryTagName(), entries[label.name])
        else:  # new segments carry Slicer's generic "Tissue" entry; a label without terminology claims none
            segment.RemoveTag(segment.GetTerminologyEntryTagName())


def segment_voxel_counts(segmentation_node: Any, reference_volume: Any) -> dict[str, int]:
    """Voxels of each segment (by name) on ``reference_volume``'s grid."""
    segmentation = segmentation_node.GetSegmentation()
    # arrayFromSegmentBinaryLabelmap leaves a labelmap display node in the scene on every call.
    with scene_rollback(segmentation_node.GetScene()):
        return {segmentation.GetSegment(segment_id).GetName(): int(np.count_nonzero(
            slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, reference_volume)))
            for segment_id in segment_ids(segmentation_node)}


def roi_corners_ras(roi_node: Any, volume_node: Any) -> tuple[float, float, float, float, float, float]:
    """The box for ``mim3d segment --roi``: two opposite corners (r0, a0, s0, r1, a1, s1) in the coordinates of the
    volume file the worker reads (the volume node's own frame).

    The ROI's world-space bounding box (its rotation and parent transforms included, so a rotated ROI gives the box
    around it) is mapped into the volume's frame when the volume sits under a transform.

    Raises:
        ValueError: the ROI has not been placed yet, or is flat (no volume).
    """
    bounds = [0.0] * 6
    roi_node.GetRASBounds(bounds)
    if roi_node.GetNumberOfControlPoints() == 0 or not all(bounds[2 * i] < bounds[2 * i + 1] for i in range(3)):
        raise ValueError(f"ROI '{roi_node.GetName()}': has no box yet; place it in a view first.")
    corners = [(x, y, z) for x in bounds[0:2] for y in bounds[2:4] for z in bounds[4:6]]
    parent = volume_node.GetParentTransformNode()
    if parent is not None:
        world_to_volume = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, parent, world_to_volume)
        corners = [world_to_volume.TransformPoint(corner) for corner in corners]
    low = [min(c[i] for c in corners) for i in range(3)]
    high = [max(c[i] for c in corners) for i in range(3)]
    return (*low, *high)
