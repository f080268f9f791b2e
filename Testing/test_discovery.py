"""mim3d.data.discovery: every supported format including the real DICOM series, several series per folder, the
summary, and each bad file skipped with its reason."""

from __future__ import annotations

import gzip
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from volume_helpers import make_image, ramp, write_dicom_series, write_image

from mim3d.data import discover_volumes
from mim3d.errors import BadInputError

UID = "1.2.826.0.1.3680043.2.1125.9"


@pytest.fixture
def scans(tmp_path: Path, example_ct_sm_path: Path, example_dicom_dir: Path) -> Path:
    """The real CT in each file format (nested folders) and the real DICOM series."""
    ct = sitk.ReadImage(str(example_ct_sm_path))
    for suffix in (".nii.gz", ".nrrd", ".mha", ".mhd"):
        write_image(tmp_path / "scans" / suffix.strip(".").replace(".", "_") / f"ct{suffix}", ct)
    shutil.copytree(example_dicom_dir, tmp_path / "scans" / "dicom" / "series")
    (tmp_path / "scans" / "README.txt").write_text("not a scan, ignored")
    return tmp_path / "scans"


def test_every_supported_format_is_found_recursively_with_its_header(scans):
    found = discover_volumes([scans])
    kinds = {v.kind: v for v in found.volumes}
    assert sorted(v.kind for v in found.volumes) == ["dicom", "mha", "mha", "nifti", "nrrd"]
    assert found.skipped == []
    assert kinds["nifti"].size == (122, 101, 30) and np.allclose(kinds["nifti"].spacing, 3.0)
    dicom = kinds["dicom"]
    assert dicom.path == scans / "dicom" / "series" and dicom.series_id == "" and len(dicom.files) == 20
    assert dicom.size == (512, 512, 20) and np.allclose(dicom.spacing, (0.9765625, 0.9765625, 2.0))


def test_a_mhd_record_counts_and_lists_its_data_file(scans):
    [mhd] = [v for v in discover_volumes([scans]).volumes if v.path.name == "ct.mhd"]
    assert [f.name for f in mhd.files] == ["ct.mhd", "ct.raw"]
    assert mhd.bytes == sum(f.stat().st_size for f in mhd.files)


def test_two_series_in_one_folder_become_two_records(tmp_path, example_dicom_dir):
    folder = tmp_path / "mixed"
    shutil.copytree(example_dicom_dir, folder)
    write_dicom_series(folder, UID, slices=5)
    records = discover_volumes([tmp_path]).volumes
    assert sorted((r.series_id, len(r.files), r.size) for r in records) == [
        ("", 20, (512, 512, 20)), (UID, 5, (32, 24, 5))]
    assert {r.path for r in records} == {folder}
    assert sorted(r.name for r in records) == ["mixed", f"mixed:{UID}"]


def test_summary_gives_count_bytes_formats_and_spacing_per_axis(scans):
    found = discover_volumes([scans])
    summary = found.summary()
    on_disk = sum(f.stat().st_size for f in scans.rglob("*") if f.is_file() and f.name != "README.txt")
    spacings = [(3.0, 3.0, 3.0)] * 4 + [(0.9765625, 0.9765625, 2.0)]
    assert summary["count"] == 5
    assert summary["total_bytes"] == on_disk
    assert summary["formats"] == {"dicom": 1, "mha": 2, "nifti": 1, "nrrd": 1}
    assert np.allclose(summary["spacing_mm"]["min"], (0.9765625, 0.9765625, 2.0))
    assert np.allclose(summary["spacing_mm"]["median"], [statistics.median(s) for s in zip(*spacings, strict=True)])
    assert np.allclose(summary["spacing_mm"]["max"], (3.0, 3.0, 3.0))
    assert summary["skipped"] == []
    assert found.describe().startswith("5 volumes, ")


@pytest.fixture
def bad_files(tmp_path: Path, example_ct_path: Path) -> Path:
    folder = tmp_path / "bad"
    write_image(folder / "flat.nii.gz", make_image(ramp((1, 20, 30))[0]))
    write_image(folder / "time.nii.gz", sitk.JoinSeries([make_image(ramp((8, 8, 8)))] * 3))
    write_image(folder / "rgb.nrrd", sitk.GetImageFromArray(np.zeros((8, 8, 8, 3), np.uint8), isVector=True))
    write_image(folder / "one.mha", make_image(ramp((1, 20, 30))))
    (folder / "cut.nii.gz").write_bytes(example_ct_path.read_bytes()[:300_000])
    (folder / "text.nii.gz").write_text("hello")
    write_image(folder / "labels.seg.nrrd", make_image(np.ones((4, 5, 6), np.uint8)))
    (folder / "broken.dcm").write_bytes(b"\0" * 200)
    (folder / "notes.txt").write_text("ignored silently")
    (folder / "._ct.nii.gz").write_bytes(b"\0" * 100)  # macOS metadata file: hidden, ignored
    return folder


def test_bad_files_are_skipped_each_with_its_reason(bad_files):
    good = write_image(bad_files / "ok" / "ct.nii.gz", make_image(ramp((6, 7, 8))))
    found = discover_volumes([bad_files])
    assert [v.path for v in found.volumes] == [good]
    reasons = {path.name: reason for path, reason in found.skipped}
    assert sorted(reasons) == ["broken.dcm", "cut.nii.gz", "flat.nii.gz", "labels.seg.nrrd", "one.mha", "rgb.nrrd",
                               "text.nii.gz", "time.nii.gz"]
    assert reasons["flat.nii.gz"].startswith("is a 2-D image (size 30×20)")
    assert reasons["time.nii.gz"].startswith("is a 4-D image (size 8×8×8×3)")
    assert reasons["rgb.nrrd"].startswith("has 3 values per voxel")
    assert reasons["one.mha"].startswith("is a single slice (size 30×20×1)")
    assert reasons["cut.nii.gz"].startswith("is truncated")
    assert reasons["text.nii.gz"].startswith("could not be read as an image")
    assert reasons["labels.seg.nrrd"] == "is a segmentation (.seg.nrrd), not a scan"
    assert reasons["broken.dcm"] == "is not a readable DICOM file"
    assert "skipped 8:" in found.describe() and "cut.nii.gz: is truncated" in found.describe()


def test_an_empty_folder_is_refused_naming_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match=rf"^{tmp_path / 'empty'}: no usable volume found"):
        discover_volumes([tmp_path / "empty"])


def test_a_folder_of_only_bad_files_is_refused_listing_why(bad_files):
    with pytest.raises(BadInputError, match=r"no usable volume found .*; skipped:\n.*cut\.nii\.gz: is truncated"):
        discover_volumes([bad_files])


def test_a_missing_folder_is_refused_naming_it(tmp_path):
    with pytest.raises(BadInputError, match=rf"{tmp_path / 'nowhere'}: is not a folder"):
        discover_volumes([tmp_path / "nowhere"])


def test_a_folder_given_twice_or_nested_is_counted_once(scans):
    assert len(discover_volumes([scans, scans / "nii_gz"]).volumes) == 5


def test_degenerate_voxels_pass_discovery_and_are_refused_when_read(tmp_path):
    flat = write_image(tmp_path / "flat.nii.gz", make_image(np.full((6, 7, 8), 40, np.int16)))
    [record] = discover_volumes([tmp_path]).volumes
    with pytest.raises(BadInputError, match=rf"{flat}: every voxel has the value 40"):
        record.read()


def test_a_volume_damaged_after_discovery_is_refused_when_read(tmp_path, example_ct_sm_path):
    path = tmp_path / "ct.nii.gz"
    shutil.copy(example_ct_sm_path, path)
    [record] = discover_volumes([tmp_path]).volumes
    path.write_bytes(gzip.compress(b"\0" * 10))
    with pytest.raises(BadInputError, match=r"ct\.nii\.gz: could not be read"):
        record.read()
