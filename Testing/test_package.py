"""Model packages: model.json + weights.safetensors, written atomically, refused when altered or inconsistent."""

import json

import pytest
import torch

from mim3d.errors import BadInputError
from mim3d.labels import LabelTable
from mim3d.models import build_segmenter
from mim3d.package import MODEL_JSON, WEIGHTS, ModelInfo, load_package, read_model_json, save_package
from mim3d.presets import config_to_dict, resolve

LABELS = LabelTable.from_dict({"labels": [{"value": 1, "name": "liver"}, {"value": 2, "name": "spleen",
                                                                            "color": [157, 108, 162]}]})


def small_info(arch: str = "mim-unetr") -> ModelInfo:
    return ModelInfo(name="test-model", version="1.0.0",
                     architecture={"arch": arch, "preset": "small", "config": config_to_dict(resolve(arch, "small")),
                                   "num_classes": 3, "in_channels": 1},
                     preprocessing={"orientation": "RAS", "spacing_mm": [1.5, 1.5, 2.0],
                                    "intensity_window_hu": [-175, 250], "foreground_crop": True},
                     inference={"roi_size": [64, 64, 64], "overlap": 0.5, "blend": "gaussian"},
                     labels=LABELS, weights_sha256="", provenance={"trained_on": "a test"})


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    torch.manual_seed(0)
    model = build_segmenter("mim-unetr", 3, preset="small", roi_size=(64, 64, 64)).eval()
    folder = tmp_path_factory.mktemp("models") / "test-model"
    save_package(folder, model, small_info())
    return folder, model


def test_package_round_trips_the_network_and_its_description(package):
    folder, model = package
    loaded, info = load_package(folder)
    assert [label.name for label in info.labels] == ["liver", "spleen"]
    assert info.labels.by_name("spleen").color == (157, 108, 162)
    assert info.roi_size == (64, 64, 64) and info.provenance == {"trained_on": "a test"}
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_model_json_is_readable_without_torch_and_records_the_weights_checksum(package):
    folder, _ = package
    data = json.loads((folder / MODEL_JSON).read_text())
    assert data["format"] == "mim3d-model" and len(data["weights"]["sha256"]) == 64
    assert read_model_json(folder).architecture["arch"] == "mim-unetr"


def test_saving_again_replaces_the_package_and_leaves_no_staging_folder(package, tmp_path):
    folder, model = package
    target = tmp_path / "pkg"
    save_package(target, model, small_info())
    save_package(target, model, small_info())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
    assert sorted(p.name for p in target.iterdir()) == [MODEL_JSON, WEIGHTS]


def copy_package(package, tmp_path):
    folder, _ = package
    target = tmp_path / "copy"
    target.mkdir()
    for name in (MODEL_JSON, WEIGHTS):
        (target / name).write_bytes((folder / name).read_bytes())
    return target


def test_altered_weights_are_refused_by_checksum(package, tmp_path):
    target = copy_package(package, tmp_path)
    data = bytearray((target / WEIGHTS).read_bytes())
    data[-10] ^= 0xFF
    (target / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(BadInputError, match=f"{WEIGHTS}: SHA-256 does not match"):
        load_package(target)


def test_weights_of_another_network_are_refused_naming_the_mismatch(package, tmp_path):
    target = copy_package(package, tmp_path)
    data = json.loads((target / MODEL_JSON).read_text())
    data["architecture"]["preset"] = "base"
    data["architecture"]["config"] = config_to_dict(resolve("mim-unetr", "base"))
    (target / MODEL_JSON).write_text(json.dumps(data))
    with pytest.raises(BadInputError, match="weights do not match the mim-unetr described in model.json"):
        load_package(target)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.pop("labels"), "field labels is missing"),
    (lambda d: d["architecture"].update(num_classes=5), "num_classes 5 does not match the labels"),
    (lambda d: d["architecture"].update(arch="swin"), "architecture.arch 'swin' is not one of"),
    (lambda d: d["inference"].update(roi_size=[64, 64, 60]), "must be three positive multiples of 16"),
    (lambda d: d.update(format="something-else"), "not a mim3d model description"),
    (lambda d: d.update(format_version=7), "format_version 7 is not supported"),
])
def test_inconsistent_model_json_is_refused_naming_the_field(package, tmp_path, edit, message):
    target = copy_package(package, tmp_path)
    data = json.loads((target / MODEL_JSON).read_text())
    edit(data)
    (target / MODEL_JSON).write_text(json.dumps(data))
    with pytest.raises(BadInputError, match=message):
        read_model_json(target)


def test_folder_without_model_json_or_with_broken_json_is_refused(tmp_path):
    with pytest.raises(BadInputError, match="not a mim3d model package"):
        read_model_json(tmp_path)
    (tmp_path / MODEL_JSON).write_text("{not json")
    with pytest.raises(BadInputError, match="not readable JSON"):
        read_model_json(tmp_path)
