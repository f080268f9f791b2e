"""mim3d.io: reading every format (the real CT and DICOM series), refusing bad files by name, the LPS/RAS conversion
on an oblique grid, and atomic writing on a reference grid."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from volume_helpers import OBLIQUE, make_image, ramp, write_dicom_series, write_image

from mim3d import io
from mim3d.errors import BadInputError


def _geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
def test_each_file_format_reads_the_same_voxels_on_the_same_grid(tmp_path, example_ct_sm_path, suffix):
    original = sitk.ReadImage(str(example_ct_sm_path))
    path = write_image(tmp_path / f"ct{suffix}", original)
    image = io.read_volume(path)
    assert _geometry(image) == _geometry(original)
    assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(original))


def test_the_real_dicom_series_with_empty_uids_reads_on_its_documented_grid(example_dicom_dir):
    image = io.read_volume(example_dicom_dir)  # JPEG 2000 lossless, UIDs '' (mim3d.example_data)
    assert image.GetSize() == (512, 512, 20)
    assert np.allclose(image.GetSpacing(), (0.9765625, 0.9765625, 2.0))
    assert np.allclose(image.GetOrigin(), (-249.51171875, -437.51171875, -804.5))
    assert sitk.GetArrayViewFromImage(image).min() >= -1024


def test_dicom_geometry_from_two_headers_matches_the_decoded_series(example_dicom_dir):
    [(uid, files)] = io.list_dicom_series(example_dicom_dir)
    geometry = io.dicom_geometry(files)
    assert uid == "" and len(files) == 20
    assert geometry.size == (512, 512, 20)
    assert np.allclose(geometry.spacing, (0.9765625, 0.9765625, 2.0))
    assert np.allclose(geometry.origin, (-249.51171875, -437.51171875, -804.5))


def test_two_series_in_one_folder_are_listed_separately_and_refused_as_one_volume(tmp_path, example_dicom_dir):
    folder = tmp_path / "mixed"
    shutil.copytree(example_dicom_dir, folder)
    write_dicom_series(folder, "1.2.826.0.1.3680043.2.1125.7", slices=5)
    series = dict((uid, files) for uid, files in io.list_dicom_series(tmp_path))
    assert {uid: len(files) for uid, files in series.items()} == {"": 20, "1.2.826.0.1.3680043.2.1125.7": 5}
    with pytest.raises(BadInputError, match=r"mixed: holds 2 DICOM series .*exactly one series"):
        io.read_volume(folder)


def test_a_two_dimensional_image_is_refused_naming_the_file(tmp_path):
    path = write_image(tmp_path / "slice.nii.gz", make_image(ramp((1, 20, 30))[0]))
    with pytest.raises(BadInputError, match=r"slice\.nii\.gz: is a 2-D image \(size 30×20\); a CT volume must be 3-D"):
        io.read_volume(path)


def test_four_dimensional_and_vector_images_are_refused(tmp_path):
    frames = [make_image(ramp((8, 8, 8))) for _ in range(3)]
    series = write_image(tmp_path / "time.nii.gz", sitk.JoinSeries(frames))  # 4-D: three time points
    vector = write_image(tmp_path / "rgb.nrrd", sitk.GetImageFromArray(np.zeros((8, 8, 8, 3), np.uint8),
                                                                       isVector=True))
    with pytest.raises(BadInputError, match=r"time\.nii\.gz: is a 4-D image \(size 8×8×8×3\)"):
        io.read_volume(series)
    with pytest.raises(BadInputError, match=r"rgb\.nrrd: has 3 values per voxel"):
        io.read_volume(vector)


def test_a_single_slice_volume_is_refused(tmp_path):
    path = write_image(tmp_path / "one.mha", make_image(ramp((1, 20, 30))))
    with pytest.raises(BadInputError, match=r"one\.mha: is a single slice \(size 30×20×1\)"):
        io.read_volume(path)


def test_a_truncated_nifti_is_refused_although_simpleitk_reads_it_padded(tmp_path, example_ct_path):
    data = example_ct_path.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    raw = tmp_path / "cut.nii"
    raw.write_bytes(gzip.decompress(data)[:100_000])
    sitk.ReadImage(str(cut))  # the reason for the check: no error from SimpleITK
    whole = 352 + 122 * 101 * 112 * 4  # NIfTI-1 voxel offset + int32 voxels
    with pytest.raises(BadInputError, match=rf"cut\.nii\.gz: is truncated: its header describes {whole} bytes, "
                                            "the file holds a compressed stream that ends early"):
        io.read_geometry(cut)
    with pytest.raises(BadInputError, match=r"cut\.nii: is truncated: .* the file holds 100000 bytes"):
        io.read_volume(raw)


def test_a_text_file_named_like_a_volume_is_refused_as_unreadable(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("not an image")
    with pytest.raises(BadInputError, match=r"notes\.nii\.gz: could not be read as an image"):
        io.read_volume(path)


def test_a_constant_volume_is_refused_but_may_be_read_as_an_empty_label(tmp_path):
    path = write_image(tmp_path / "flat.nrrd", make_image(np.full((4, 5, 6), -1000, np.int16)))
    with pytest.raises(BadInputError, match=r"flat\.nrrd: every voxel has the value -1000"):
        io.read_volume(path)
    assert io.read_volume(path, check_values=False).GetSize() == (6, 5, 4)


def test_check_volume_refuses_nan_voxels_naming_the_file():
    array = np.zeros((4, 5, 6), np.float32)
    array[1, 2, 3] = np.nan
    array[0, 0, 0] = 5
    with pytest.raises(BadInputError, match=r"scan\.nii\.gz: has 1 NaN or infinite voxels"):
        io.check_volume(make_image(array), "scan.nii.gz")


def test_ras_array_and_affine_of_an_oblique_image_match_a_hand_computation():
    spacing, origin = (0.7, 0.9, 2.5), (12.0, -30.0, 41.0)
    image = make_image(ramp((5, 4, 3)), spacing, origin, OBLIQUE)
    array, affine = io.image_to_ras(image)
    assert array.shape == (3, 4, 5)  # (I, J, K)
    i, j, k = 2, 1, 4
    assert array[i, j, k] == image.GetPixel(i, j, k)
    lps = np.array(origin) + OBLIQUE @ (np.array(spacing) * (i, j, k))  # ITK: origin + D·diag(spacing)·index
    ras = lps * (-1, -1, 1)
    assert np.allclose(affine @ (i, j, k, 1), [*ras, 1])
    assert np.allclose(lps, image.TransformIndexToPhysicalPoint((i, j, k)))


def test_ras_to_image_round_trips_an_oblique_grid():
    image = make_image(ramp((5, 4, 3)), (0.7, 0.9, 2.5), (12.0, -30.0, 41.0), OBLIQUE)
    back = io.ras_to_image(*io.image_to_ras(image))
    assert back.GetSize() == image.GetSize()
    assert np.allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-12)
    assert np.allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-12)
    assert np.allclose(back.GetDirection(), image.GetDirection(), atol=1e-12)
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))


def test_orient_ras_makes_the_axes_increase_towards_r_a_s_keeping_each_voxel_in_place():
    image = make_image(ramp((4, 5, 6)), (1.0, 2.0, 3.0), (5.0, 6.0, 7.0))  # identity direction: L, P, S in LPS
    oriented = io.orient_ras(image)
    array, affine = io.image_to_ras(oriented)
    assert np.allclose(affine[:3, :3], np.diag([1.0, 2.0, 3.0]))
    before = image.TransformIndexToPhysicalPoint((1, 2, 3))
    after = oriented.TransformPhysicalPointToIndex(before)
    assert oriented.GetPixel(after) == image.GetPixel(1, 2, 3)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".seg.nrrd"])
def test_write_like_copies_an_oblique_reference_grid_and_leaves_no_temporary_file(tmp_path, suffix):
    reference = make_image(ramp((5, 4, 3)), (0.7, 0.9, 2.5), (12.0, -30.0, 41.0), OBLIQUE)
    labels = (np.arange(60).reshape(5, 4, 3) % 3).astype(np.uint8)
    path = io.write_like(labels, reference, tmp_path / f"out{suffix}")
    written = sitk.ReadImage(str(path))
    if suffix == ".mha":  # MetaImage stores spacing and direction apart, in full precision: bit for bit
        assert _geometry(written) == _geometry(reference)
    else:  # NRRD stores spacing·direction columns, so the spacing read back may differ in the last bit
        assert written.GetSize() == reference.GetSize()
        for got, want in zip(_geometry(written)[1:], _geometry(reference)[1:], strict=True):
            assert np.allclose(got, want, rtol=0, atol=1e-12)
    assert np.array_equal(sitk.GetArrayViewFromImage(written), labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"out{suffix}"]


def test_write_like_keeps_the_real_ct_grid_exactly_in_nifti(tmp_path, example_ct_sm_path):
    reference = sitk.ReadImage(str(example_ct_sm_path))
    labels = np.zeros(reference.GetSize()[::-1], np.uint8)
    written = sitk.ReadImage(str(io.write_like(labels, reference, tmp_path / "seg.nii.gz")))
    assert _geometry(written) == _geometry(reference)
    assert [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]


def test_write_like_refuses_an_array_that_does_not_fit_the_reference(tmp_path):
    reference = make_image(ramp((5, 4, 3)))
    with pytest.raises(BadInputError, match=r"out\.nii\.gz: array of shape \(3, 4, 5\) does not fit the reference "
                                            r"grid 3×4×5 \(expected shape \(5, 4, 3\) in K, J, I order\)"):
        io.write_like(np.zeros((3, 4, 5), np.uint8), reference, tmp_path / "out.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_volume_names_keep_compound_suffixes_together():
    assert io.volume_stem(Path("a/case_001.nii.gz")) == "case_001"
    assert io.volume_kind("x.seg.nrrd") == "nrrd" and io.volume_suffix("x.seg.nrrd") == ".seg.nrrd"
    assert io.volume_kind("notes.txt") is None
    assert io.is_dicom_candidate("CT.1.3.12.2.16573") and not io.is_dicom_candidate("notes.txt")
