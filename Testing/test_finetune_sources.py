"""mim3d.data.finetune_sources: pairing images with labels (folders, dataset.json, .seg.nrrd), the label checks and
their messages, and label maps read onto the image grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from volume_helpers import make_image, ramp, write_image

from mim3d import io
from mim3d.data import (
    FinetuneCase,
    cases_from_dataset_json,
    cases_from_folders,
    cases_from_segmentations,
    check_cases,
    read_label,
    validate_cases,
)
from mim3d.errors import BadInputError
from mim3d.labels import LabelTable, from_segment_names

SHAPE = (8, 12, 16)  # (K, J, I): images are 16×12×8
SPACING = (2.0, 2.0, 3.0)
LPS_TO_RAS_GRID = np.diag([-1.0, -1.0, 1.0])  # a grid whose axes point to R, A, S, as slicerio writes it here
TABLE = from_segment_names(["liver", "spleen"])


def _labels(values=(1, 2)) -> np.ndarray:
    array = np.zeros(SHAPE, np.uint8)
    array[2:4, 3:6, 4:8] = values[0]
    array[5:7, 6:9, 9:12] = values[1]
    return array


def _write_case(folder: Path, image_name: str, label_name: str | None, labels=None, **grid) -> None:
    grid = {"spacing": SPACING, "direction": LPS_TO_RAS_GRID} | grid
    write_image(folder / "images" / image_name, make_image(ramp(SHAPE), spacing=SPACING, direction=LPS_TO_RAS_GRID))
    if label_name:
        write_image(folder / "labels" / label_name, make_image(_labels() if labels is None else labels, **grid))


def test_images_and_labels_are_paired_by_file_name(tmp_path):
    _write_case(tmp_path, "a.nii.gz", "a.nii.gz")
    _write_case(tmp_path, "b.nrrd", "b.nii.gz")
    cases = cases_from_folders(tmp_path / "images", tmp_path / "labels")
    assert [(c.name, c.image_path.name, c.label.name) for c in cases] == [
        ("a", "a.nii.gz", "a.nii.gz"), ("b", "b.nrrd", "b.nii.gz")]
    assert check_cases(cases, TABLE) == []


def test_nnunet_channel_suffix_pairs_case_0000_with_case(tmp_path):
    _write_case(tmp_path, "liver_007_0000.nii.gz", "liver_007.nii.gz")
    [case] = cases_from_folders(tmp_path / "images", tmp_path / "labels")
    assert case.name == "liver_007" and case.label.name == "liver_007.nii.gz"


def test_several_nnunet_channels_of_one_case_are_refused(tmp_path):
    _write_case(tmp_path, "x_0000.nii.gz", "x.nii.gz")
    _write_case(tmp_path, "x_0001.nii.gz", None)
    with pytest.raises(BadInputError, match=r"several images \(nnU-Net channels\) are not supported: x \(x_0000, "
                                            r"x_0001\)"):
        cases_from_folders(tmp_path / "images", tmp_path / "labels")


def test_images_without_labels_are_all_listed(tmp_path):
    _write_case(tmp_path, "a.nii.gz", "a.nii.gz")
    _write_case(tmp_path, "b.nii.gz", None)
    _write_case(tmp_path, "c.nii.gz", None)
    with pytest.raises(BadInputError, match=rf"{tmp_path / 'labels'}: has no label for 2 image\(s\) of "
                                            rf"{tmp_path / 'images'}: b\.nii\.gz, c\.nii\.gz"):
        cases_from_folders(tmp_path / "images", tmp_path / "labels")


def test_msd_dataset_json_paths_are_relative_to_its_folder(tmp_path, monkeypatch):
    root = tmp_path / "Task03_Liver"
    _write_case(root, "liver_1.nii.gz", "liver_1.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "liver", "2": "spleen"},
        "training": [{"image": "./images/liver_1.nii.gz", "label": "./labels/liver_1.nii.gz"}]}))
    monkeypatch.chdir(tmp_path)
    cases, table = cases_from_dataset_json(root / "dataset.json")
    assert [(c.name, c.image_path, c.label) for c in cases] == [
        ("liver_1", root / "images" / "liver_1.nii.gz", root / "labels" / "liver_1.nii.gz")]
    assert table.names == ("liver", "spleen")
    assert check_cases(cases, table) == []


def test_nnunet_v2_dataset_json_reads_images_tr_and_labels_tr_beside_it(tmp_path):
    root = tmp_path / "Dataset001"
    write_image(root / "imagesTr" / "c1_0000.nii.gz", make_image(ramp(SHAPE)))
    write_image(root / "labelsTr" / "c1.nii.gz", make_image(_labels()))
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2},
                                                   "file_ending": ".nii.gz", "channel_names": {"0": "CT"}}))
    cases, table = cases_from_dataset_json(root / "dataset.json")
    assert [c.name for c in cases] == ["c1"] and table == TABLE


def test_dataset_json_listing_missing_files_is_refused_naming_them(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "liver"},
        "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]}))
    with pytest.raises(BadInputError, match=r"dataset\.json: lists 2 file\(s\) that do not exist: "
                                            r".*imagesTr/x\.nii\.gz, .*labelsTr/x\.nii\.gz"):
        cases_from_dataset_json(tmp_path / "dataset.json")


def _write_segmentation(path: Path, segments: list[tuple[str, tuple, np.ndarray]], origin=(0.0, 0.0, 0.0)) -> None:
    """A .seg.nrrd with named segments; masks are (I, J, K) on a 2×2×3 mm grid whose axes point to R, A, S."""
    ijk_to_lps = np.diag([-2.0, -2.0, 3.0, 1.0])
    ijk_to_lps[:3, 3] = origin
    seg = slicerio.create_segmentation(segments[0][2].shape, ijk_to_lps)
    for name, color, mask in segments:
        slicerio.add_segment(seg, mask, {"id": name, "name": name, "color": list(color)})
    path.parent.mkdir(parents=True, exist_ok=True)
    slicerio.write_segmentation(str(path), seg)


def _mask(box: tuple[slice, slice, slice], shape=(16, 12, 8)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[box] = True
    return mask


def test_segment_names_become_the_label_table_and_each_file_finds_its_reference_image(tmp_path):
    image = make_image(ramp(SHAPE), spacing=SPACING, direction=LPS_TO_RAS_GRID)
    write_image(tmp_path / "a.nii.gz", image)
    write_image(tmp_path / "b.nrrd", image)
    liver, spleen, kidney = (np.s_[1:5, 1:5, 1:3], np.s_[4:8, 4:8, 2:4], np.s_[10:14, 2:6, 5:7])
    _write_segmentation(tmp_path / "a.seg.nrrd", [("liver", (1.0, 0.0, 0.0), _mask(liver)),
                                                  ("spleen", (0.0, 0.0, 1.0), _mask(spleen))])  # overlap: 2 layers
    _write_segmentation(tmp_path / "b segmentation.seg.nrrd", [("kidney", (0.0, 1.0, 0.0), _mask(kidney)),
                                                               ("spleen", (0.0, 0.0, 1.0), _mask(spleen))])
    cases, table = cases_from_segmentations(tmp_path)
    assert [(label.value, label.name, label.color) for label in table] == [
        (1, "liver", (255, 0, 0)), (2, "spleen", (0, 0, 255)), (3, "kidney", (0, 255, 0))]
    assert [(c.name, c.image_path.name) for c in cases] == [("a", "a.nii.gz"), ("b segmentation", "b.nrrd")]
    assert check_cases(cases, table) == []
    label_ijk = io.image_to_ras(read_label(cases[1], image))[0]  # (I, J, K)
    assert (label_ijk == 3).sum() == _mask(kidney).sum() and (label_ijk[kidney] == 3).all()
    assert (label_ijk == 2).sum() == _mask(spleen).sum() and not (label_ijk == 1).any()
    first = io.image_to_ras(read_label(cases[0], image))[0]
    assert (first[spleen] == 2).all() and (first == 1).sum() == (_mask(liver) & ~_mask(spleen)).sum()


def test_a_segmentation_cropped_to_its_segments_is_placed_on_the_image_grid(tmp_path):
    image = make_image(ramp(SHAPE), spacing=SPACING, direction=LPS_TO_RAS_GRID)
    write_image(tmp_path / "ct.nii.gz", image)
    crop = np.ones((4, 3, 2), bool)  # voxels I 5..8, J 2..4, K 3..4 of the image
    _write_segmentation(tmp_path / "ct.seg.nrrd", [("liver", (1.0, 0.0, 0.0), crop)],
                        origin=image.TransformIndexToPhysicalPoint((5, 2, 3)))
    [case], table = cases_from_segmentations(tmp_path)
    assert check_cases([case], table) == []
    label_ijk = io.image_to_ras(read_label(case, image))[0]
    assert label_ijk.shape == (16, 12, 8)
    assert label_ijk.sum() == 24 and (label_ijk[5:9, 2:5, 3:5] == 1).all()


def test_a_segmentation_without_a_reference_image_is_refused_with_the_rule(tmp_path):
    _write_segmentation(tmp_path / "one" / "x.seg.nrrd", [("liver", (1.0, 0.0, 0.0), _mask(np.s_[1:3, 1:3, 1:3]))])
    write_image(tmp_path / "one" / "p.nii.gz", make_image(ramp(SHAPE)))
    write_image(tmp_path / "one" / "q.nii.gz", make_image(ramp(SHAPE)))
    with pytest.raises(BadInputError, match=r"no reference image found for .*one/x\.seg\.nrrd: put X\.nii\.gz"):
        cases_from_segmentations(tmp_path)


def test_label_values_outside_the_table_are_reported_with_the_case_and_the_values(tmp_path):
    _write_case(tmp_path, "a.nii.gz", "a.nii.gz", labels=_labels(values=(1, 7)))
    cases = cases_from_folders(tmp_path / "images", tmp_path / "labels")
    assert check_cases(cases, TABLE) == [
        f"{tmp_path / 'labels' / 'a.nii.gz'}: case a has label values 7 that are not in the label table (1 liver, "
        "2 spleen); relabel them or add them to the table."]


def test_a_grid_mismatch_is_reported_with_both_sizes(tmp_path):
    _write_case(tmp_path, "case_007.nii.gz", "case_007.nii.gz", labels=_labels()[:7])
    cases = cases_from_folders(tmp_path / "images", tmp_path / "labels")
    assert check_cases(cases, TABLE) == [
        f"{tmp_path / 'labels' / 'case_007.nii.gz'}: grid 16×12×7 does not match image case_007.nii.gz (16×12×8); "
        "export the label on the image grid."]


def test_spacing_and_origin_mismatches_are_reported_together_with_the_numbers(tmp_path):
    _write_case(tmp_path, "a.nii.gz", "a.nii.gz", spacing=(2.0, 2.0, 2.5), origin=(0.0, 0.0, 4.0))
    [problem] = check_cases(cases_from_folders(tmp_path / "images", tmp_path / "labels"), TABLE)
    assert problem.endswith("a.nii.gz: spacing 2×2×2.5 mm does not match image a.nii.gz (2×2×3 mm); origin (0, 0, 4) "
                            "mm does not match (0, 0, 0) mm; export the label on the image grid.")
    with pytest.raises(BadInputError, match=r"spacing 2×2×2\.5 mm does not match image a\.nii\.gz"):
        read_label(cases_from_folders(tmp_path / "images", tmp_path / "labels")[0],
                   make_image(ramp(SHAPE), spacing=SPACING, direction=LPS_TO_RAS_GRID))


def test_validate_cases_raises_one_error_listing_every_problem(tmp_path):
    _write_case(tmp_path, "a.nii.gz", "a.nii.gz", labels=_labels(values=(1, 9)))
    _write_case(tmp_path, "b.nii.gz", "b.nii.gz", labels=_labels()[:5])
    with pytest.raises(BadInputError, match=r"(?s)2 problem\(s\) in the fine-tuning data:\n.*a\.nii\.gz: case a has "
                                            r"label values 9.*\n.*b\.nii\.gz: grid 16×12×5 does not match"):
        validate_cases(cases_from_folders(tmp_path / "images", tmp_path / "labels"), TABLE)


def test_real_totalsegmentator_labels_remapped_to_the_project_table_pass_the_checks(example_ct_sm_path,
                                                                                     example_seg_path):
    table = LabelTable.from_dict({"labels": [{"value": 1, "name": "liver"}, {"value": 2, "name": "spleen"}]})
    as_stored = FinetuneCase(example_ct_sm_path, example_seg_path, "ct_sm")
    [problem] = check_cases([as_stored], table)
    assert "case ct_sm has label values 3, 4, 5, 6, 7," in problem  # the "total" ids (mim3d.example_data)
    remapped = FinetuneCase(example_ct_sm_path, example_seg_path, "ct_sm", label_map={5: 1, 1: 2})
    assert check_cases([remapped], table) == []
    image = sitk.ReadImage(str(example_ct_sm_path))
    label = sitk.GetArrayFromImage(read_label(remapped, image))
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(example_seg_path)))
    assert np.array_equal(label == 1, source == 5) and np.array_equal(label == 2, source == 1)
    assert set(np.unique(label)) == {0, 1, 2}


def test_a_label_map_to_values_outside_the_table_is_reported(example_ct_sm_path, example_seg_path):
    case = FinetuneCase(example_ct_sm_path, example_seg_path, "ct_sm", label_map={5: 1, 1: 4})
    assert check_cases([case], TABLE) == [
        f"{example_seg_path}: label_map of case ct_sm maps to 4, not in the label table (1 liver, 2 spleen)."]
