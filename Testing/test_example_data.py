"""The real example data: what the files are, and how the cache refuses corrupt downloads and tampered files."""

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import SimpleITK as sitk

from mim3d import example_data as example_data_module
from mim3d.example_data import (
    DICOM_DIR,
    PRETRAIN_CTS,
    SDIST,
    VOLUMES,
    ExampleDataError,
    _cache_name,
    class_names,
    default_cache_dir,
    install_sdist,
    path,
    verify,
)


def _grid(file: Path) -> tuple[tuple[int, ...], tuple[float, ...], str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(file))
    reader.ReadImageInformation()
    return reader.GetSize(), reader.GetSpacing(), sitk.GetPixelIDValueAsString(reader.GetPixelID())


@pytest.fixture
def cache_copy(example_data: Path, tmp_path: Path) -> Path:
    """A private copy of the example cache that a test may damage; the real cache is never touched."""
    return Path(shutil.copytree(example_data, tmp_path / "example-data"))


# --- the files (TEST_DATA.md §3) -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("name", "size", "pixel_type"),
    [
        ("example_ct.nii.gz", (122, 101, 112), "32-bit signed integer"),  # int32, unlike the other CTs
        ("example_ct_sm.nii.gz", (122, 101, 30), "16-bit signed integer"),
        ("example_seg.nii.gz", (122, 101, 30), "8-bit unsigned integer"),
        ("example_seg_fast_force_split.nii.gz", (122, 101, 112), "8-bit unsigned integer"),
        ("example_mr_sm.nii.gz", (117, 91, 20), "16-bit signed integer"),
        ("example_seg_mr.nii.gz", (117, 91, 20), "8-bit unsigned integer"),
    ],
)
def test_volume_has_the_documented_grid_at_3_mm(example_data: Path, name: str, size: tuple, pixel_type: str):
    assert _grid(example_data / name) == (size, (3.0, 3.0, 3.0), pixel_type)


@pytest.mark.parametrize(("name", "size"), [("aorta_report_ct.nii.gz", (233, 167, 191)),
                                           ("pulmonary_report_ct.nii.gz", (122, 102, 112))])
def test_pretraining_cts_have_the_documented_grid_at_1_5_mm(example_data: Path, name: str, size: tuple):
    assert _grid(example_data / name) == (size, (1.5, 1.5, 1.5), "16-bit signed integer")


def test_dicom_series_reads_as_512x512x20_at_the_documented_position(example_dicom_dir: Path):
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(example_dicom_dir))  # the series UID is empty; GDCM still groups it
    reader.SetFileNames(files)
    image = reader.Execute()

    assert len(files) == 20
    assert image.GetSize() == (512, 512, 20)
    assert image.GetSpacing() == pytest.approx((0.977, 0.977, 2.0), abs=1e-3)
    assert image.GetOrigin() == pytest.approx((-249.5, -437.5, -804.5), abs=0.05)  # LPS, mm


def test_dicom_labels_share_the_series_grid(example_data: Path):
    size, spacing, _ = _grid(example_data / "example_seg_dicom.nii.gz")
    assert size == (512, 512, 20)
    assert spacing == pytest.approx((0.977, 0.977, 2.0), abs=1e-3)


def test_every_documented_file_is_in_the_cache_with_the_sdist_licence(example_data: Path):
    for name in (*VOLUMES, *PRETRAIN_CTS, DICOM_DIR, "LICENSE"):
        assert path(name, example_data).exists(), name
    assert "Apache License" in path("LICENSE", example_data).read_text()


def test_unknown_file_name_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match="unknown example file 'ct.nii.gz'; choose from example_ct.nii.gz"):
        path("ct.nii.gz")


# --- class names, parsed from map_to_binary.py without running it ----------------------------------------------------

def test_total_task_names_liver_5_and_spleen_1(example_data: Path):
    names = class_names(cache_dir=example_data)
    assert (names[5], names[1]) == ("liver", "spleen")
    assert len(names) == 117


def test_mr_task_has_its_own_id_space(example_data: Path):
    names = class_names("total_mr", example_data)
    assert (names[1], len(names)) == ("spleen", 50)


def test_unknown_task_is_refused_with_the_valid_tasks(example_data: Path):
    with pytest.raises(ValueError, match=r"unknown TotalSegmentator task 'totl'; choose from .*\btotal\b"):
        class_names("totl", example_data)


# --- integrity -------------------------------------------------------------------------------------------------------

def test_full_verify_detects_a_file_changed_in_place(cache_copy: Path):
    ct = cache_copy / "example_ct.nii.gz"
    data = bytearray(ct.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, so only the hash can tell
    ct.write_bytes(bytes(data))

    verify(cache_copy)  # the cheap size check passes
    with pytest.raises(ExampleDataError, match=r"example_ct\.nii\.gz: does not match its checksum in manifest\.json"):
        verify(cache_copy, full_check=True)


def test_size_check_detects_a_missing_dicom_slice(cache_copy: Path):
    next((cache_copy / DICOM_DIR).iterdir()).unlink()
    with pytest.raises(ExampleDataError, match=rf"{DICOM_DIR}/CT\.[0-9.]+: is missing; delete .* and fetch again"):
        verify(cache_copy)


def test_sdist_with_the_wrong_checksum_is_refused_and_nothing_is_extracted(tmp_path: Path):
    fake = tmp_path / "download" / SDIST
    fake.parent.mkdir()
    with tarfile.open(fake, "w:gz"):  # a valid, empty archive: only the checksum can refuse it
        pass
    cache_root = tmp_path / "cache"

    with pytest.raises(ExampleDataError, match=rf"{fake}: SHA-256 is [0-9a-f]{{64}}, expected 5d4223ef"):
        install_sdist(fake, cache_root / "example-data")
    assert not cache_root.exists()


def test_an_earlier_versions_extraction_is_replaced_by_a_complete_one(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch):
    top = SDIST.removesuffix(".tar.gz") + "/"
    members = {**{f"tests/reference_files/{n}": n for n in VOLUMES},
               **{f"tests/reference_files/{m}": n for n, m in PRETRAIN_CTS.items()},
               "LICENSE": "LICENSE", "totalsegmentator/map_to_binary.py": "map_to_binary.py",
               f"tests/reference_files/{DICOM_DIR}/CT.1": f"{DICOM_DIR}/CT.1"}
    sdist = tmp_path / SDIST
    with tarfile.open(sdist, "w:gz") as tar:  # a small stand-in with the sdist's layout, pinned below by its hash
        for member, name in members.items():
            (tmp_path / "file").write_text(name)
            tar.add(tmp_path / "file", top + member)
    monkeypatch.setattr(example_data_module, "SDIST_SHA256", hashlib.sha256(sdist.read_bytes()).hexdigest())
    old = tmp_path / "example-data"  # what the previous version extracted: no pre-training CTs in its manifest
    old.mkdir()
    (old / "example_ct.nii.gz").write_text("old")
    (old / "manifest.json").write_text(json.dumps({"files": {"example_ct.nii.gz": {"size": 3, "sha256": ""}}}))

    install_sdist(sdist, old)

    assert sorted(p.relative_to(old).as_posix() for p in old.rglob("*") if p.is_file()) == sorted(
        [*members.values(), "manifest.json"])
    assert (old / "aorta_report_ct.nii.gz").read_text() == "aorta_report_ct.nii.gz"
    verify(old, full_check=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing left beside it


def test_members_outside_the_allow_list_are_never_extracted():
    def member(name: str, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        return info

    top = "totalsegmentator-2.18.0/"
    assert _cache_name(member(top + "tests/reference_files/example_ct.nii.gz")) == "example_ct.nii.gz"
    assert _cache_name(member(top + "tests/reference_files/example_ct_dicom/CT.1")) == "example_ct_dicom/CT.1"
    assert _cache_name(member(top + "tests/reference_files/example_ct_dicom/../../../../etc/passwd")) is None
    assert _cache_name(member(top + "tests/reference_files/example_ct_dicom/..")) is None
    assert _cache_name(member(top + "tests/reference_files/example_ct.nii.gz", tarfile.SYMTYPE)) is None
    assert _cache_name(member(top + "setup.py")) is None


def test_cache_folder_follows_mim3d_home(mim3d_home: Path, monkeypatch: pytest.MonkeyPatch):
    assert default_cache_dir() == mim3d_home / "example-data"
    monkeypatch.delenv("MIM3D_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "mim3d" / "example-data"


# --- command line ----------------------------------------------------------------------------------------------------

def _fetch(cache: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mim3d.example_data", "fetch", "--cache", str(cache)]
    return subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)


def test_fetch_prints_the_verified_folder(cache_copy: Path):
    done = _fetch(cache_copy)
    assert (done.returncode, done.stdout.strip()) == (0, str(cache_copy))


def test_fetch_exits_2_naming_a_tampered_file(cache_copy: Path):
    seg = cache_copy / "example_seg.nii.gz"
    seg.write_bytes(bytes(seg.stat().st_size))  # zeroed, same size

    done = _fetch(cache_copy)
    assert done.returncode == 2
    assert f"error: {seg}: does not match its checksum" in done.stderr
    assert done.stdout == ""
