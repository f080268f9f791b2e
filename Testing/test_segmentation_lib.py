"""MiMSegmentationLib's light parts: dependency checks, the panel's model list, and the self-test model package."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from job_helpers import save_tiny_package
from segment_helpers import model_info
from volume_helpers import make_image

from mim3d import registry
from mim3d.package import read_model_json
from MiMPretrainLib import training_runs
from MiMSegmentationLib import dependencies, model_list
from MiMSegmentationLib.selftest_model import LABELS

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "MiMSegmentation"


# ---- dependencies ---------------------------------------------------------------------------------------------------

def test_requirements_file_lists_the_worker_packages_but_never_slicers_own():
    requirements = dependencies.read_requirements(MODULE_DIR / "Resources" / "requirements.txt")
    names = {line.split(">")[0].split("=")[0].split("<")[0].strip().lower() for line in requirements}
    assert {"monai", "safetensors", "einops", "slicerio"} <= names
    assert not names & {p.lower() for p in dependencies.PROTECTED_PACKAGES}


def test_unmet_reports_missing_and_out_of_range_packages_only():
    numpy_version = dependencies.installed_version("numpy")
    assert dependencies.unmet([f"numpy=={numpy_version}", "monai>=1.0"]) == []
    assert dependencies.unmet(["numpy<1.0", "surely-not-installed-mim3d-package>=1"]) == [
        "numpy<1.0", "surely-not-installed-mim3d-package>=1"]
    assert dependencies.unmet(['numpy<1.0; python_version < "3.0"']) == []  # marker not applicable
    assert dependencies.torch_installed()


def test_requirements_of_this_checkout_are_all_met_in_the_test_environment():
    assert dependencies.REQUIREMENTS_FILE == MODULE_DIR / "Resources" / "requirements.txt"
    assert dependencies.unmet_requirements() == []
    assert dependencies.worker_ready()


def test_protected_constraints_pin_the_installed_versions(tmp_path):
    constraints = dependencies.protected_constraints()
    assert f"numpy=={dependencies.installed_version('numpy')}" in constraints
    assert f"SimpleITK=={dependencies.installed_version('SimpleITK')}" in constraints
    requirements = tmp_path / "r.txt"
    requirements.write_text("# comment\n\nmonai>=1.4  # trailing\n", encoding="utf-8")
    assert dependencies.read_requirements(requirements) == ["monai>=1.4"]


# ---- installing what the worker needs ------------------------------------------------------------------------------

def _requirements(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "requirements.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _site(tmp_path: Path, monkeypatch) -> Path:
    """A folder on sys.path where an installer leaves distributions (their metadata is what ``unmet`` reads)."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    return site


def _install_metadata(site: Path, requirements: list[str]) -> None:
    """What pip leaves for each requirement: NAME-1.0.dist-info/METADATA (the payload does not matter here)."""
    for line in requirements:
        name = line.split(">")[0].split("=")[0].split("<")[0].strip()
        info = site / f"{name.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n", encoding="utf-8")


def _never(*args, **kwargs):
    pytest.fail(f"must not be called: {args} {kwargs}")


def test_met_requirements_install_nothing_and_ask_nothing(tmp_path):
    requirements = _requirements(tmp_path, f"numpy=={dependencies.installed_version('numpy')}")
    assert dependencies.install_requirements(_never, _never, tmp_path, requirements_file=requirements)


def test_declining_the_install_is_a_quiet_cancel(tmp_path):
    requirements = _requirements(tmp_path, "mim3d-test-absent-package>=1")
    asked = []
    declined = dependencies.install_requirements(lambda text: asked.append(text) or False, _never, tmp_path,
                                                 requirements_file=requirements)
    assert declined is False  # no exception, so no error dialog
    assert asked == ["MiM needs these Python packages, which will be installed now:\nmim3d-test-absent-package>=1"]
    assert not (tmp_path / "constraints.txt").exists()


def test_slicer_5_10_installs_with_pip_install_and_the_constraints(tmp_path, monkeypatch):
    site = _site(tmp_path, monkeypatch)
    requirements = _requirements(tmp_path, "mim3d-test-absent-package>=1")
    calls = []

    def pip_install(args):
        calls.append(args)
        _install_metadata(site, args[2:])

    assert dependencies.install_requirements(lambda text: True, pip_install, tmp_path, packaging=None,
                                             requirements_file=requirements)
    assert calls == [["-c", str(tmp_path / "constraints.txt"), "mim3d-test-absent-package>=1"]]
    assert (tmp_path / "constraints.txt").read_text(encoding="utf-8").splitlines() == \
        dependencies.protected_constraints()


PACKAGING_5_12 = """
calls = []  # slicer.packaging.pip_ensure's keyword arguments as Slicer 5.12 defines them (checked against its source)


def pip_ensure(requirements, constraints=None, skip_packages=None, prompt_install=True, prompt_restart=True,
               requester=None, skip_in_testing=True, show_progress=True):
    calls.append(dict(requirements=requirements, constraints=constraints, prompt_install=prompt_install,
                      requester=requester))
"""


def test_slicer_5_12_installs_through_pip_ensure_although_its_submodule_was_never_imported(tmp_path, monkeypatch):
    import slicer

    assert dependencies.slicer_packaging() is None  # slicer-core, like Slicer 5.10, has no slicer.packaging
    (tmp_path / "slicer-5.12").mkdir()
    (tmp_path / "slicer-5.12" / "packaging.py").write_text(PACKAGING_5_12, encoding="utf-8")
    monkeypatch.setattr(slicer, "__path__", [*slicer.__path__, str(tmp_path / "slicer-5.12")])
    try:
        assert not hasattr(slicer, "packaging")  # the check the module used: false until someone imports it
        packaging = dependencies.slicer_packaging()
        assert packaging is not None and packaging.__name__ == "slicer.packaging"
        site = _site(tmp_path, monkeypatch)
        requirements = _requirements(tmp_path, "mim3d-test-absent-package>=1")
        with pytest.raises(RuntimeError, match="still missing after the install: mim3d-test-absent-package>=1"):
            dependencies.install_requirements(lambda text: True, _never, tmp_path, packaging=packaging,
                                              requirements_file=requirements)  # pip_ensure here installs nothing
        assert packaging.calls == [dict(requirements=["mim3d-test-absent-package>=1"],
                                        constraints=str(tmp_path / "constraints.txt"), prompt_install=False,
                                        requester="MiM")]
        _install_metadata(site, ["mim3d-test-absent-package"])
        assert dependencies.install_requirements(_never, _never, tmp_path, packaging=packaging,
                                                 requirements_file=requirements)
    finally:
        sys.modules.pop("slicer.packaging", None)
        if hasattr(slicer, "packaging"):
            delattr(slicer, "packaging")


# ---- model list ---------------------------------------------------------------------------------------------------

def _catalog(tmp_path: Path, *entries: dict) -> Path:
    path = tmp_path / "Models.json"
    path.write_text(json.dumps({"models": list(entries)}), encoding="utf-8")
    return path


def _entry(model_id: str, version: str = "1.0.0", **extra) -> dict:
    return {"id": model_id, "name": f"Model {model_id}", "version": version, "url": f"https://example.org/{model_id}.zip",
            "sha256": "0" * 64, "size": 123_000_000, "description": "Abdominal organs.", "licence": "CC-BY-4.0",
            "expected": {"gpu_seconds": 4, "cpu_seconds": 180, "gpu_memory_gb": 3.5, "cpu_memory_gb": 2.8}, **extra}


def _install(home: Path, model_id: str, version: str = "1.0.0") -> None:
    folder = home / model_id
    folder.mkdir(parents=True)
    info = model_info()
    data = info.to_dict()
    data["version"] = version
    (folder / "model.json").write_text(json.dumps(data), encoding="utf-8")
    (folder / "weights.safetensors").write_bytes(b"")


def test_model_choices_list_installed_then_downloadable_with_size_time_and_licence(tmp_path):
    home = tmp_path / "models"
    _install(home, "liver-small")
    (home / "broken").mkdir()
    catalog = _catalog(tmp_path, _entry("abdomen-base", labels=["liver", "spleen"]), _entry("liver-small"))
    choices = model_list.model_choices(home, catalog)
    assert [(c.id, c.installed, c.usable, c.downloadable) for c in choices] == [
        ("broken", True, False, False), ("liver-small", True, True, False), ("abdomen-base", False, False, True)]
    assert "model.json" in choices[0].detail
    assert choices[1].title == "liver-small 1.0.0"
    assert "tissue, right edge" in choices[1].detail
    detail = choices[2].detail
    for fact in ("Abdominal organs.", "Segments: liver, spleen.", "download 123 MB", "weights licence CC-BY-4.0",
                 "about 4 s on a GPU, 3.5 GB GPU memory", "about 3 min on a CPU, 2.8 GB RAM"):
        assert fact in detail


def test_the_model_list_sees_a_model_registered_by_mimpretrain_and_a_deleted_one(tmp_path):
    home = tmp_path / "models"
    models = model_list.ModelList(home, _catalog(tmp_path))
    assert models.refresh() == [] and not models.stale()
    run = tmp_path / "runs" / "Liver run 2"  # a finished fine-tuning run, as MiMPretrain's "Use for segmentation" sees
    save_tiny_package(run / "model", spacing_mm=5.0)
    (run / "config.json").write_text(json.dumps({"command": "finetune"}), encoding="utf-8")
    (run / "status.json").write_text(json.dumps({"state": "finished"}), encoding="utf-8")

    training_runs.register_model(run, home=home)
    assert models.stale()
    assert [choice.id for choice in models.refresh()] == ["liver-run-2"] and not models.stale()
    registry.delete("liver-run-2", home)
    assert models.stale() and models.refresh() == []


def test_a_newer_catalog_version_of_an_installed_model_is_offered_as_an_update(tmp_path):
    home = tmp_path / "models"
    _install(home, "liver-small", "1.0.0")
    choices = model_list.model_choices(home, _catalog(tmp_path, _entry("liver-small", "1.1.0")))
    assert [(c.id, c.installed, c.usable, c.downloadable) for c in choices] == [("liver-small", True, True, True)]
    assert choices[0].title.endswith("(update)")


def test_the_shipped_catalog_loads():
    assert isinstance(model_list.model_choices(Path("/nonexistent-home"), registry.DEFAULT_CATALOG), list)


# ---- the self-test model package ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def selftest_package(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("selftest") / "mim-selftest"
    env = {"PYTHONPATH": str(MODULE_DIR)}
    subprocess.run([sys.executable, "-m", "MiMSegmentationLib.selftest_model", str(folder)], check=True,
                   env={**__import__("os").environ, **env}, timeout=300)
    return folder


def test_selftest_model_labels_every_voxel_body_through_the_real_worker(selftest_package, tmp_path):
    info = read_model_json(selftest_package)
    assert info.labels.to_dict() == {"labels": LABELS["labels"]}
    array = np.full((18, 22, 26), -1000, np.int16)
    array[3:15, 4:18, 5:20] = 40
    angle = np.deg2rad(25)
    direction = (np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1)
    image = make_image(array, spacing=(1.5, 2.0, 2.5), origin=(30.0, -12.0, 40.0), direction=direction)
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    run = subprocess.run([sys.executable, "-m", "mim3d", "segment", str(tmp_path / "ct.nrrd"), "--model",
                          str(selftest_package), "--output", str(tmp_path / "labels.nrrd"), "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    labels = sitk.ReadImage(str(tmp_path / "labels.nrrd"))
    assert labels.GetSize() == image.GetSize() and labels.GetDirection() == pytest.approx(image.GetDirection())
    assert np.array_equal(np.unique(sitk.GetArrayViewFromImage(labels)), [1])
