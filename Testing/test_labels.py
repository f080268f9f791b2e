"""mim3d.labels: the label table, labels.json, both dataset.json label styles, and checks whose messages name the
file and field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mim3d.errors import BadInputError
from mim3d.labels import DEFAULT_COLORS, Label, LabelTable, from_dataset_json, from_segment_names

LIVER_TERMS = {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"]}


def test_labels_json_round_trip_keeps_values_names_colours_and_terminology(tmp_path):
    table = LabelTable((Label(1, "liver", (221, 130, 101), LIVER_TERMS), Label(3, "spleen", (157, 108, 162))))
    table.save(tmp_path / "labels.json")
    loaded = LabelTable.load(tmp_path / "labels.json")
    assert loaded == table
    assert loaded.labels[0].terminology == LIVER_TERMS
    assert loaded.num_classes == 4  # channels 0..3; channel 2 is never trained
    assert json.loads((tmp_path / "labels.json").read_text())["labels"][1] == {
        "value": 3, "name": "spleen", "color": [157, 108, 162]}
    assert [p.name for p in tmp_path.iterdir()] == ["labels.json"]


def test_msd_style_dataset_json_labels_become_a_table_without_background():
    table = from_dataset_json({"labels": {"0": "background", "2": "spleen", "1": "liver"}})
    assert [(label.value, label.name) for label in table] == [(1, "liver"), (2, "spleen")]
    assert [label.color for label in table] == list(DEFAULT_COLORS[:2])


def test_nnunet_v2_style_dataset_json_labels_give_the_same_table():
    msd = from_dataset_json({"labels": {"0": "background", "1": "liver", "2": "spleen"}})
    assert from_dataset_json({"labels": {"background": 0, "liver": 1, "spleen": 2}}) == msd


def test_nnunet_region_labels_are_refused_by_name():
    with pytest.raises(BadInputError, match=r'dataset\.json: labels: "tumour": \[1, 2\] is not a value/name pair'):
        from_dataset_json({"labels": {"background": 0, "tumour": [1, 2]}})


def test_duplicate_names_are_refused_naming_the_file_and_the_name(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"labels": [{"value": 1, "name": "liver"}, {"value": 2, "name": "liver"}]}))
    with pytest.raises(BadInputError, match=r"labels\.json: labels\[1\]\.name: 'liver' is used twice"):
        LabelTable.load(path)


def test_duplicate_values_are_refused_naming_both_labels():
    with pytest.raises(BadInputError, match=r"table\.json: labels\[1\]\.value: 1 is used twice \(again by 'spleen'\)"):
        LabelTable.from_dict({"labels": [{"value": 1, "name": "liver"}, {"value": 1, "name": "spleen"}]},
                             "table.json")


@pytest.mark.parametrize(("entry", "message"), [
    ({"value": 256, "name": "x"}, r"labels\[0\]\.value: 256 is not an integer in 1\.\.255"),
    ({"value": 1.5, "name": "x"}, r"labels\[0\]\.value: 1\.5 is not an integer"),
    ({"value": 1, "name": " "}, r"labels\[0\]\.name: ' ' must be a non-empty text"),
    ({"value": 1, "name": "x", "color": [0, 300, 0]}, r"labels\[0\]\.color: \(0, 300, 0\) must be three integers"),
    ({"value": 1, "name": "x", "color": "red"}, r"labels\[0\]\.color: 'red' must be three integers"),
])
def test_invalid_entries_are_refused_naming_the_field(entry, message):
    with pytest.raises(BadInputError, match=message):
        LabelTable.from_dict({"labels": [entry]}, "labels.json")


def test_an_explicit_background_entry_is_accepted_and_dropped():
    table = LabelTable.from_dict({"labels": [{"value": 0, "name": "background"}, {"value": 1, "name": "liver"}]})
    assert table.values == (1,)


def test_a_file_that_is_not_json_is_refused_naming_it(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text("{not json")
    with pytest.raises(BadInputError, match=r"labels\.json: is not a readable JSON file"):
        LabelTable.load(path)
    with pytest.raises(BadInputError, match=r"missing\.json: no such file"):
        LabelTable.load(tmp_path / "missing.json")


def test_segment_names_are_numbered_in_order_with_palette_colours_where_none_is_given():
    table = from_segment_names(["liver", "spleen", "kidney"], [(255, 0, 0), None, None])
    assert [(label.value, label.name, label.color) for label in table] == [
        (1, "liver", (255, 0, 0)), (2, "spleen", DEFAULT_COLORS[1]), (3, "kidney", DEFAULT_COLORS[2])]
    assert table.by_name("kidney").value == 3 and table.by_value(2).name == "spleen"


def test_labels_module_imports_without_numpy_or_torch():
    code = ("import sys; sys.modules.update(numpy=None, torch=None, SimpleITK=None, monai=None); "
            "import mim3d.labels")
    root = Path(__file__).resolve().parents[1] / "MiMSegmentation"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
