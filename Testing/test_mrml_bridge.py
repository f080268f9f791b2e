"""MiMSegmentationLib.mrml_bridge against real MRML (slicer-core): label files in, segmentations and training data out.

Volumes are built with slicer.util.addVolumeFromArray on axis-aligned, flipped/permuted, left-handed and oblique grids;
label files are written by SimpleITK on the grid of the volume file the bridge wrote, as the mim3d worker does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import slicerio
import vtk
from mrml_scene import headless_scene
from volume_helpers import OBLIQUE

from mim3d.labels import Label, LabelTable
from MiMPretrainLib.scene_export import export_training_case, export_training_data, label_table_from_segmentation
from MiMSegmentationLib.mrml_bridge import (
    import_labels,
    roi_corners_ras,
    segment_voxel_counts,
    terminology_entry,
    write_volume,
)

LIVER_TERMS = {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"]}
SPLEEN_TERMS = {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "78961009", "Spleen"]}
LIVER_ENTRY = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
               "~SCT^10200004^Liver~^^~~^^~^^")
# Values 1, 2, 4: a gap, so value and position in the table differ for "kidney".
TABLE = LabelTable((Label(1, "liver", (221, 130, 101), LIVER_TERMS), Label(2, "spleen", (157, 108, 162), SPLEEN_TERMS),
                    Label(4, "kidney", (185, 102, 83))))
SHAPE_KJI = (5, 6, 7)


def _ijk_to_ras(spacing, origin, directions) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(directions, dtype=float) @ np.diag(spacing)
    matrix[:3, 3] = origin
    return matrix


GRIDS = {
    "axis-aligned": _ijk_to_ras((0.8, 0.9, 2.5), (-10.0, 20.0, 30.0), np.eye(3)),
    # I runs to the left (R -> L), J up (S), K to the front (A): flipped and permuted axes, right-handed.
    "flipped": _ijk_to_ras((0.7, 1.1, 2.0), (15.5, -3.25, 8.0), [[-1, 0, 0], [0, 0, 1], [0, 1, 0]]),
    # As "flipped" with K to the back: left-handed, which Slicer's reader stores with K reversed.
    "left-handed": _ijk_to_ras((0.7, 1.1, 2.0), (15.5, -3.25, 8.0), [[-1, 0, 0], [0, 0, -1], [0, 1, 0]]),
    "oblique": _ijk_to_ras((0.75, 1.25, 3.0), (-120.5, 40.25, -7.0), OBLIQUE),
}
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture
def scene():
    with headless_scene() as scene:
        yield scene


def add_volume(ijk_to_ras: np.ndarray, name: str = "ct") -> slicer.vtkMRMLScalarVolumeNode:
    array = (np.arange(np.prod(SHAPE_KJI)) * 7 - 300).astype(np.int16).reshape(SHAPE_KJI)
    return slicer.util.addVolumeFromArray(array, ijkToRAS=ijk_to_ras, name=name)


def known_labels() -> np.ndarray:
    """(K, J, I) labels: liver and spleen at known voxels (asymmetric), kidney absent."""
    labels = np.zeros(SHAPE_KJI, np.uint8)
    labels[0, 1, 2] = labels[0, 1, 3] = labels[4, 5, 6] = 1
    labels[2, 3, 1:5] = 2
    return labels


def write_label_file(volume, folder: Path, labels_kji: np.ndarray, name: str = "labels.nii.gz") -> Path:
    """``labels_kji`` written by SimpleITK on the grid of the file write_volume makes from ``volume``."""
    reference = sitk.ReadImage(str(write_volume(volume, folder / "input.nrrd")))
    image = sitk.GetImageFromArray(labels_kji)
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(folder / name))
    return folder / name


def lps_matrix(image: sitk.Image) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = np.reshape(image.GetDirection(), (3, 3)) @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def reference_geometry(segmentation) -> tuple[np.ndarray, list[int]]:
    """The IJK-to-RAS matrix and extent of a segmentation's reference image geometry."""
    matrix, extent = vtk.vtkMatrix4x4(), [0] * 6
    serialized = segmentation.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    assert slicer.vtkSegmentationConverter.DeserializeImageGeometry(serialized, matrix, extent)
    return slicer.util.arrayFromVTKMatrix(matrix), extent


def node_ids(scene) -> list[str]:
    return [node.GetID() for node in scene.GetNodes()]


def segment_array(segmentation, name: str, volume) -> np.ndarray:
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, name, volume)


def painted_segmentation(scene, volume, masks: dict[str, np.ndarray]):
    """A segmentation painted independently of import_labels: one segment per (name, (K, J, I) mask)."""
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "painted")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for i, (name, mask) in enumerate(masks.items()):
        segmentation.GetSegmentation().AddEmptySegment(name, name, (0.1 * i, 0.5, 1.0))
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), segmentation, name, volume)
    return segmentation


# ---- import_labels ------------------------------------------------------------------------------------------------

def test_each_table_label_becomes_a_segment_with_its_name_colour_value_and_terminology(scene, tmp_path):
    volume = add_volume(GRIDS["axis-aligned"])
    path = write_label_file(volume, tmp_path, known_labels())
    before = node_ids(scene)

    node = import_labels(path, volume, TABLE)

    segmentation = node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    segments = [segmentation.GetSegment(i) for i in ids]
    assert ids == ["liver", "spleen", "kidney"]
    assert [s.GetName() for s in segments] == ["liver", "spleen", "kidney"]
    assert [s.GetLabelValue() for s in segments] == [1, 2, 4]
    for segment, label in zip(segments, TABLE, strict=True):
        assert list(segment.GetColor()) == pytest.approx([c / 255 for c in label.color], abs=1e-9)
        assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()
    tags = [vtk.reference("") for _ in segments]
    assert [s.GetTag("TerminologyEntry", t) for s, t in zip(segments, tags, strict=True)] == [True, True, False]
    assert str(tags[0]) == LIVER_ENTRY
    assert node.GetName() == "ct segmentation"
    added = [scene.GetNodeByID(i).GetClassName() for i in node_ids(scene) if i not in before]
    assert sorted(added) == ["vtkMRMLSegmentationDisplayNode", "vtkMRMLSegmentationNode"]  # no temporary leftovers


@pytest.mark.parametrize("grid", GRIDS)
def test_labels_written_by_simpleitk_land_on_the_same_ijk_voxels(scene, tmp_path, grid):
    volume = add_volume(GRIDS[grid])
    labels = known_labels()

    node = import_labels(write_label_file(volume, tmp_path, labels), volume, TABLE)

    for label in TABLE:
        np.testing.assert_array_equal(segment_array(node, label.name, volume), labels == label.value,
                                      err_msg=f"{grid}: {label.name}")


@pytest.mark.parametrize("reorder", [lambda image: sitk.Flip(image, [False, True, True]),
                                     lambda image: sitk.PermuteAxes(image, [2, 0, 1])], ids=["reversed", "permuted"])
def test_labels_stored_with_reordered_axes_land_on_the_same_voxels(scene, tmp_path, reorder):
    volume = add_volume(GRIDS["oblique"])
    labels = known_labels()
    path = write_label_file(volume, tmp_path, labels)
    sitk.WriteImage(reorder(sitk.ReadImage(str(path))), str(path))  # same voxels in space, other index order

    node = import_labels(path, volume, TABLE)

    for label in TABLE:
        np.testing.assert_array_equal(segment_array(node, label.name, volume), labels == label.value)


@pytest.mark.parametrize("grid", GRIDS)
def test_segmentation_reference_geometry_is_the_input_volume_grid(scene, tmp_path, grid):
    volume = add_volume(GRIDS[grid])

    node = import_labels(write_label_file(volume, tmp_path, known_labels()), volume, TABLE)

    matrix, extent = reference_geometry(node)
    np.testing.assert_allclose(matrix, GRIDS[grid], atol=1e-9)
    assert extent == [0, SHAPE_KJI[2] - 1, 0, SHAPE_KJI[1] - 1, 0, SHAPE_KJI[0] - 1]
    assert node.GetNodeReferenceID("referenceImageGeometryRef") == volume.GetID()


def test_voxel_counts_per_segment_equal_the_label_array_counts(scene, tmp_path):
    volume = add_volume(GRIDS["oblique"])
    labels = known_labels()
    node = import_labels(write_label_file(volume, tmp_path, labels), volume, TABLE)
    before = node_ids(scene)

    counts = segment_voxel_counts(node, volume)

    assert counts == {"liver": 3, "spleen": 4, "kidney": 0}
    assert counts == {label.name: int(np.count_nonzero(labels == label.value)) for label in TABLE}
    assert node_ids(scene) == before


def test_reused_segmentation_node_is_refilled_without_leftovers(scene, tmp_path):
    volume = add_volume(GRIDS["flipped"])
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    node.GetSegmentation().AddEmptySegment("old", "old")
    import_labels(write_label_file(volume, tmp_path, known_labels()), volume, TABLE, segmentation_node=node)
    node_id, before = node.GetID(), node_ids(scene)
    second = np.zeros(SHAPE_KJI, np.uint8)
    second[1, 1, 1] = 4

    again = import_labels(write_label_file(volume, tmp_path, second, "second.nrrd"), volume, TABLE,
                          segmentation_node=node)

    assert again is node and node.GetID() == node_id and node.GetName() == "mine"
    assert segment_voxel_counts(node, volume) == {"liver": 0, "spleen": 0, "kidney": 1}
    assert node.GetSegmentation().GetNumberOfSegments() == 3
    assert node_ids(scene) == before


def test_new_segmentation_is_placed_beside_the_volume_and_a_reused_one_stays_where_it_is(scene, tmp_path):
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient")
    study = hierarchy.CreateStudyItem(patient, "study")
    volume = add_volume(GRIDS["flipped"])
    hierarchy.CreateItem(study, volume)
    elsewhere = hierarchy.CreateFolderItem(hierarchy.GetSceneItemID(), "my results")
    mine = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    hierarchy.CreateItem(elsewhere, mine)

    new = import_labels(write_label_file(volume, tmp_path, known_labels()), volume, TABLE)
    import_labels(write_label_file(volume, tmp_path, known_labels(), "again.nrrd"), volume, TABLE,
                  segmentation_node=mine)

    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(new)) == study
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(mine)) == elsewhere


def test_segmentation_follows_a_transformed_volume(scene, tmp_path):
    volume = add_volume(GRIDS["oblique"])
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(_ijk_to_ras((1, 1, 1), (5, -7, 11), OBLIQUE)))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    labels = known_labels()

    node = import_labels(write_label_file(volume, tmp_path, labels), volume, TABLE)

    assert node.GetTransformNodeID() == transform.GetID()
    np.testing.assert_allclose(reference_geometry(node)[0], GRIDS["oblique"], atol=1e-9)
    np.testing.assert_array_equal(segment_array(node, "spleen", volume), labels == 2)


def test_show_3d_adds_closed_surfaces(scene, tmp_path):
    volume = add_volume(GRIDS["axis-aligned"])

    node = import_labels(write_label_file(volume, tmp_path, known_labels()), volume, TABLE, name="3d", show_3d=True)

    assert node.GetName() == "3d"
    assert node.GetSegmentation().ContainsRepresentation("Closed surface")


def _shifted_file(volume, tmp_path):
    reference = sitk.ReadImage(str(write_volume(volume, tmp_path / "input.nrrd")))
    image = sitk.GetImageFromArray(known_labels())
    image.CopyInformation(reference)
    image.SetOrigin(np.add(reference.GetOrigin(), (0.4, 0.0, 0.0)).tolist())
    sitk.WriteImage(image, str(tmp_path / "shifted.nii.gz"))
    return tmp_path / "shifted.nii.gz", "lie up to 0.4 mm from those of volume 'ct'"


def _resized_file(volume, tmp_path):
    image = sitk.GetImageFromArray(np.zeros((5, 6, 8), np.uint8))
    sitk.WriteImage(image, str(tmp_path / "resized.nrrd"))
    return tmp_path / "resized.nrrd", r"grid 8×6×5 \(I×J×K\) does not match volume 'ct' \(7×6×5\)"


def _unknown_value_file(volume, tmp_path):
    labels = known_labels()
    labels[0, 0, 0], labels[1, 0, 0] = 3, 9
    path = write_label_file(volume, tmp_path, labels, "unknown.nii.gz")
    return path, "holds values 3, 9 that are not in the label table"


def _garbage_file(volume, tmp_path):
    (tmp_path / "garbage.nrrd").write_text("not a volume", encoding="utf-8")
    return tmp_path / "garbage.nrrd", "is not a readable label map"


def _missing_file(volume, tmp_path):
    return tmp_path / "missing.nii.gz", "no such file"


@pytest.mark.parametrize("make_file", [_missing_file, _garbage_file, _resized_file, _shifted_file,
                                       _unknown_value_file])
@pytest.mark.parametrize("reuse", [False, True])
def test_bad_label_file_is_refused_naming_it_and_the_scene_is_unchanged(scene, tmp_path, make_file, reuse):
    volume = add_volume(GRIDS["oblique"])
    path, problem = make_file(volume, tmp_path)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode") if reuse else None
    if reuse:
        node.GetSegmentation().AddEmptySegment("kept", "kept")
    before = node_ids(scene)

    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: .*{problem}"):
        import_labels(path, volume, TABLE, segmentation_node=node)

    assert node_ids(scene) == before
    if reuse:
        assert node.GetSegmentation().GetSegmentIdBySegmentName("kept") == "kept"


# ---- write_volume -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
@pytest.mark.parametrize("grid", GRIDS)
def test_written_volume_has_the_same_voxels_and_lps_geometry(scene, tmp_path, grid, suffix):
    volume = add_volume(GRIDS[grid])
    before = node_ids(scene)

    path = write_volume(volume, tmp_path / f"ct{suffix}")

    image = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), slicer.util.arrayFromVolume(volume))
    tolerance = 1e-9 if suffix == ".nrrd" else 1e-5  # NIfTI headers hold float32
    np.testing.assert_allclose(lps_matrix(image), LPS_FROM_RAS @ GRIDS[grid], atol=tolerance)
    assert volume.GetStorageNode() is None
    assert node_ids(scene) == before


def test_volume_without_voxels_is_refused_by_name(scene, tmp_path):
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "nothing")

    with pytest.raises(ValueError, match="^volume 'nothing' has no image data"):
        write_volume(empty, tmp_path / "x.nrrd")


def test_volume_file_format_must_be_known(scene, tmp_path):
    volume = add_volume(GRIDS["axis-aligned"])

    with pytest.raises(ValueError, match=r"ct\.png: cannot write a volume in this format; use \.nrrd, \.nii\.gz"):
        write_volume(volume, tmp_path / "ct.png")


# ---- terminology --------------------------------------------------------------------------------------------------

FULL_TERMS = {"contextName": "My context", "category": ["SCT", "49755003", "Morphologically Altered Structure"],
              "type": ["SCT", "4147007", "Mass"], "typeModifier": ["SCT", "6574001", "Necrotic"],
              "anatomicRegion": ["SCT", "23451007", "Adrenal gland"],
              "anatomicRegionModifier": ["SCT", "24028007", "Right"]}


def test_terminology_entry_is_slicers_seven_field_string():
    assert terminology_entry(TABLE.labels[0]) == LIVER_ENTRY
    assert terminology_entry(Label(1, "mass", (1, 2, 3), FULL_TERMS)) == (
        "My context~SCT^49755003^Morphologically Altered Structure~SCT^4147007^Mass~SCT^6574001^Necrotic"
        "~Anatomic codes - DICOM master list~SCT^23451007^Adrenal gland~SCT^24028007^Right")
    assert terminology_entry(TABLE.labels[2]) is None
    assert terminology_entry(Label(1, "half", (1, 2, 3), {"category": LIVER_TERMS["category"]})) is None


@pytest.mark.parametrize("terms", [LIVER_TERMS, FULL_TERMS])
def test_terminology_entry_round_trips_through_slicerio_and_slicer(scene, terms):
    entry = terminology_entry(Label(1, "x", (1, 2, 3), terms))

    parsed = slicerio.segmentation.terminology_entry_from_string(entry)
    assert {k: v for k, v in parsed.items() if k not in ("contextName", "anatomicContextName")} == {
        k: v for k, v in terms.items() if k != "contextName"}
    assert slicerio.segmentation.terminology_entry_to_string(parsed) == entry
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    node.GetSegmentation().AddEmptySegment("x", "x")
    node.GetSegmentation().GetSegment("x").SetTerminology(entry)
    assert label_table_from_segmentation(node).labels[0].terminology == parsed
    slicer_entry = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(entry, slicer_entry)
    assert slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(slicer_entry) == entry
    assert slicer_entry.GetTypeObject().GetCodeValue() == terms["type"][1]


def test_terminology_entry_matches_the_seg_nrrd_writer():
    from mim3d.inference.output import segments

    written = [slicerio.segmentation.terminology_entry_to_string(s["terminology"]) for s in segments(TABLE)[:2]]

    assert written == [terminology_entry(label) for label in TABLE.labels[:2]]


def test_malformed_terminology_code_is_refused_naming_the_label():
    label = Label(1, "liver", (1, 2, 3), {**LIVER_TERMS, "type": ["SCT", "10200004"]})

    with pytest.raises(ValueError, match=r"^label 'liver': terminology.type: \['SCT', '10200004'\] is not a code"):
        terminology_entry(label)


# ---- training data ------------------------------------------------------------------------------------------------

def test_label_table_from_segmentation_gives_names_colours_and_terminology_in_segment_order(scene, tmp_path):
    volume = add_volume(GRIDS["axis-aligned"])
    node = import_labels(write_label_file(volume, tmp_path, known_labels()), volume, TABLE)
    contexts = {"contextName": "Segmentation category and type - 3D Slicer General Anatomy list"}

    table = label_table_from_segmentation(node)

    assert table.to_dict() == {"labels": [
        {"value": 1, "name": "liver", "color": [221, 130, 101], "terminology": {**contexts, **LIVER_TERMS}},
        {"value": 2, "name": "spleen", "color": [157, 108, 162], "terminology": {**contexts, **SPLEEN_TERMS}},
        {"value": 3, "name": "kidney", "color": [185, 102, 83]}]}


def test_segment_editor_default_terminology_is_read_back(scene):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "edited")
    segment_id = node.GetSegmentation().AddEmptySegment("", "tissue", (0.0, 0.5, 1.0))
    default = slicer.vtkSegment().GetTerminology()  # the entry Slicer gives a new segment
    node.GetSegmentation().GetSegment(segment_id).SetTag("TerminologyEntry", default)

    (label,) = label_table_from_segmentation(node)

    assert label.color == (0, 128, 255)
    assert label.terminology == slicerio.segmentation.terminology_entry_from_string(default)
    assert terminology_entry(label) == default


def test_label_table_of_an_empty_segmentation_is_refused(scene):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "blank")

    with pytest.raises(ValueError, match="^segmentation 'blank' has no segments"):
        label_table_from_segmentation(node)


@pytest.mark.parametrize("grid", GRIDS)
def test_training_case_is_written_on_the_volume_grid_with_table_values(scene, tmp_path, grid):
    volume = add_volume(GRIDS[grid])
    liver, tumour = np.zeros(SHAPE_KJI, bool), np.zeros(SHAPE_KJI, bool)
    liver[1:3, 2:4, 3:6] = True
    tumour[4, 0, 0] = tumour[0, 5, 6] = True
    segmentation = painted_segmentation(scene, volume, {"tumour": tumour, "liver": liver})
    table = LabelTable((Label(3, "liver", (1, 2, 3)), Label(7, "tumour", (4, 5, 6))))
    before = node_ids(scene)

    export_training_case(volume, segmentation, tmp_path / "image.nrrd", tmp_path / "label.nrrd", table)

    image, label = sitk.ReadImage(str(tmp_path / "image.nrrd")), sitk.ReadImage(str(tmp_path / "label.nrrd"))
    expected = np.where(liver, 3, np.where(tumour, 7, 0))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), expected)
    assert label.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), slicer.util.arrayFromVolume(volume))
    for written in (image, label):
        np.testing.assert_allclose(lps_matrix(written), LPS_FROM_RAS @ GRIDS[grid], atol=1e-9)
    assert node_ids(scene) == before


def test_training_case_with_a_segment_not_in_the_table_is_refused_naming_it(scene, tmp_path):
    volume = add_volume(GRIDS["axis-aligned"])
    labels = known_labels()
    segmentation = painted_segmentation(scene, volume, {"liver": labels == 1, "gallbladder": labels == 2})
    before = node_ids(scene)

    with pytest.raises(ValueError, match="^segmentation 'painted': segment 'gallbladder' is not in the label table"):
        export_training_case(volume, segmentation, tmp_path / "i.nrrd", tmp_path / "l.nrrd", TABLE)

    assert not list(tmp_path.iterdir())
    assert node_ids(scene) == before


@pytest.mark.parametrize("masks, problem", [({}, "has no segments"),
                                            ({"liver": np.zeros(SHAPE_KJI, bool)}, "has no painted voxels")])
def test_training_case_without_segmented_voxels_is_refused(scene, tmp_path, masks, problem):
    volume = add_volume(GRIDS["axis-aligned"])
    segmentation = painted_segmentation(scene, volume, masks)

    with pytest.raises(ValueError, match=f"^segmentation 'painted' {problem}"):
        export_training_case(volume, segmentation, tmp_path / "i.nrrd", tmp_path / "l.nrrd", TABLE)

    assert not list(tmp_path.iterdir())


def _two_cases(scene):
    first = add_volume(GRIDS["oblique"], "CT chest (1)")
    second = add_volume(GRIDS["flipped"], "ct chest [1]")
    labels = known_labels()
    return [(first, painted_segmentation(scene, first, {"liver": labels == 1, "spleen": labels == 2})),
            (second, painted_segmentation(scene, second, {"kidney": labels == 2, "spleen": labels == 1}))]


def test_training_data_is_a_finetune_folder_pair_with_a_merged_label_table(scene, tmp_path):
    cases = _two_cases(scene)
    out = tmp_path / "data"

    result = export_training_data(cases, out)

    assert result == {"images": out / "imagesTr", "labels": out / "labelsTr", "label_table": out / "labels.json",
                      "cases": ["CT_chest_1", "ct_chest_1_2"]}
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["CT_chest_1.nrrd", "ct_chest_1_2.nrrd"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["CT_chest_1.nrrd", "ct_chest_1_2.nrrd"]
    table = json.loads((out / "labels.json").read_text(encoding="utf-8"))
    assert [(entry["value"], entry["name"], entry["color"]) for entry in table["labels"]] == [
        (1, "liver", [0, 128, 255]), (2, "spleen", [26, 128, 255]), (3, "kidney", [0, 128, 255])]
    assert LabelTable.load(out / "labels.json").names == ("liver", "spleen", "kidney")
    second = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / "ct_chest_1_2.nrrd")))
    np.testing.assert_array_equal(second, np.where(known_labels() == 2, 3, np.where(known_labels() == 1, 2, 0)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_training_data_export_that_fails_leaves_the_previous_export(scene, tmp_path):
    cases = _two_cases(scene)
    out = tmp_path / "data"
    export_training_data(cases[:1], out)
    cases[1][1].GetSegmentation().AddEmptySegment("unpainted", "unpainted")
    cases[1][1].GetSegmentation().RemoveSegment("kidney")
    cases[1][1].GetSegmentation().RemoveSegment("spleen")

    with pytest.raises(ValueError, match="^segmentation 'painted' has no painted voxels"):
        export_training_data(cases, out)

    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["CT_chest_1.nrrd"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_training_data_replaces_a_previous_export_but_not_other_files(scene, tmp_path):
    cases = _two_cases(scene)
    out = tmp_path / "data"
    export_training_data(cases, out)

    assert export_training_data(cases[1:], out)["cases"] == ["ct_chest_1"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["ct_chest_1.nrrd"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'mine'))}: already holds other files \(notes"):
        export_training_data(cases, tmp_path / "mine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "mine"]


# ---- ROI box for the worker -----------------------------------------------------------------------------------------

def _roi(scene, center, radius):
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetXYZ(*center)
    roi.SetRadiusXYZ(*radius)
    return roi


def _linear_transform(scene, matrix: np.ndarray):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    return transform


def test_roi_corners_are_the_roi_box_in_ras(scene):
    volume = add_volume(np.eye(4))
    roi = _roi(scene, (10, 20, 30), (5, 6, 7))
    assert roi_corners_ras(roi, volume) == pytest.approx((5, 14, 23, 15, 26, 37))


def test_a_rotated_roi_gives_the_box_around_it(scene):
    volume = add_volume(np.eye(4))
    roi = _roi(scene, (0, 0, 0), (10, 10, 5))
    angle = np.deg2rad(45)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    roi.SetAndObserveTransformNodeID(_linear_transform(scene, rotation).GetID())
    half = 10 * np.sqrt(2)
    assert roi_corners_ras(roi, volume) == pytest.approx((-half, -half, -5, half, half, 5))


def test_roi_corners_are_mapped_into_the_frame_of_a_transformed_volume(scene):
    shift = np.eye(4)
    shift[:3, 3] = (100, -50, 20)  # volume frame -> world
    volume = add_volume(np.eye(4))
    volume.SetAndObserveTransformNodeID(_linear_transform(scene, shift).GetID())
    roi = _roi(scene, (110, -40, 30), (5, 5, 5))
    assert roi_corners_ras(roi, volume) == pytest.approx((5, 5, 5, 15, 15, 15))


def test_an_roi_without_a_box_is_refused_by_name(scene):
    volume = add_volume(np.eye(4))
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "unplaced")
    with pytest.raises(ValueError, match="ROI 'unplaced': has no box yet"):
        roi_corners_ras(roi, volume)
