"""Fixtures shared by the host test suite.

The example data (real CT / MR from the TotalSegmentator 2.18.0 sdist, see ``mim3d.example_data``) lives in the user's
cache and persists across runs; ``./run.sh test`` fetches it before pytest starts. A test that writes under MIM3D_HOME
asks for ``mim3d_home`` to get an empty one of its own.
"""

from pathlib import Path

import pytest

from mim3d.example_data import DICOM_DIR, ensure


@pytest.fixture(scope="session")
def example_data() -> Path:
    """The verified folder holding the example files (downloaded once if missing)."""
    return ensure()


@pytest.fixture(scope="session")
def example_ct_path(example_data: Path) -> Path:
    """Abdominal CT, 122×101×112 at 3 mm, int32 (lower chest to pelvis)."""
    return example_data / "example_ct.nii.gz"


@pytest.fixture(scope="session")
def example_ct_sm_path(example_data: Path) -> Path:
    """The top 30 slices of example_ct as int16, with example_ct's origin (so not registered to it)."""
    return example_data / "example_ct_sm.nii.gz"


@pytest.fixture(scope="session")
def example_seg_path(example_data: Path) -> Path:
    """TotalSegmentator "total" labels for example_ct_sm (its model's output, not manual ground truth)."""
    return example_data / "example_seg.nii.gz"


@pytest.fixture(scope="session")
def example_dicom_dir(example_data: Path) -> Path:
    """A 20-slice CT DICOM series (JPEG 2000 lossless, empty UIDs) of another person."""
    return example_data / DICOM_DIR


@pytest.fixture
def mim3d_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty MIM3D_HOME for this test only."""
    home = tmp_path / "mim3d-home"
    home.mkdir()
    monkeypatch.setenv("MIM3D_HOME", str(home))
    return home
