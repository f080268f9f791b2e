"""MiMSegmentationLib.selftest_checks, the checks of the in-Slicer self-test, run on the host against real MRML
(slicer-core): they pass on what the worker's self-test model writes, and each one catches what it is there for.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk
from mrml_scene import headless_scene

from mim3d.labels import LabelTable
from MiMSegmentationLib import mrml_bridge, selftest_checks
from MiMSegmentationLib.selftest_model import LABELS


@pytest.fixture
def scene():
    with headless_scene() as scene:
        yield scene


def _selftest_result(volume, work_dir):
    """What `mim3d segment` writes with the self-test model: every voxel selftest-body (1), on the volume's grid."""
    written = sitk.ReadImage(str(mrml_bridge.write_volume(volume, work_dir / "input.nrrd")))
    labels = sitk.GetImageFromArray(np.ones(sitk.GetArrayViewFromImage(written).shape, np.uint8))
    labels.CopyInformation(written)
    sitk.WriteImage(labels, str(work_dir / "labels.nrrd"))
    return mrml_bridge.import_labels(work_dir / "labels.nrrd", volume, LabelTable.from_dict(LABELS))


def test_the_self_test_models_result_passes_the_self_tests_checks(scene, tmp_path):
    volume = selftest_checks.oblique_volume()
    node = _selftest_result(volume, tmp_path)
    assert selftest_checks.selftest_segment_problems(node, volume) == []
    assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 0  # the geometry export is gone


def test_the_labels_import_check_of_the_self_test_passes_on_an_oblique_volume(scene, tmp_path):
    assert selftest_checks.labels_import_problems(tmp_path) == []


def test_each_check_reports_what_differs(scene, tmp_path):
    volume = selftest_checks.oblique_volume()
    node = _selftest_result(volume, tmp_path)
    body = node.GetSegmentation().GetSegment("selftest-body")
    body.SetColor(0.1, 0.2, 0.3)
    body.RemoveTag(body.GetTerminologyEntryTagName())
    other = selftest_checks.oblique_volume("shifted")
    other.SetOrigin(5.0, 0.0, 0.0)
    problems = selftest_checks.segment_problems(node, other, {"selftest-body": 1, "selftest-empty": 0},
                                                LabelTable.from_dict(LABELS))
    assert [p.split(" ")[:2] for p in problems] == [["voxel", "counts"], ["segment", "'selftest-body'"],
                                                     ["segment", "'selftest-body'"], ["IJK-to-RAS", "[[1.4095,"]]
    assert "colour [26, 51, 76], expected [221, 130, 101]" in problems[1]
    assert "terminology type None, expected ['SCT', '10200004', 'Liver']" in problems[2]


def test_a_private_mim3d_home_is_restored_after_the_block_also_when_it_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("MIM3D_HOME", "/the/users/home")
    with pytest.raises(RuntimeError), selftest_checks.private_mim3d_home(tmp_path / "home") as home:
        assert os.environ["MIM3D_HOME"] == str(home) == str(tmp_path / "home")
        raise RuntimeError("a failing self-test")
    assert os.environ["MIM3D_HOME"] == "/the/users/home"
    monkeypatch.delenv("MIM3D_HOME")
    with selftest_checks.private_mim3d_home(tmp_path / "home"):
        pass
    assert "MIM3D_HOME" not in os.environ
