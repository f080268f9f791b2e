"""The options of `mim3d pretrain` / `mim3d finetune` (mim3d.run_options): one dataclass per command whose fields give
the parser, its help, config.json and the panel's command line; and the one vocabulary in mim3d.presets."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mim3d import presets
from mim3d.errors import BadInputError
from mim3d.run_options import FinetuneOptions, PretrainOptions, add_arguments, resolve

REPO = Path(__file__).resolve().parents[1]


def parser_for(cls) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser, cls)
    return parser


@pytest.mark.parametrize("cls, flag, shown", [
    (PretrainOptions, "--epochs", "800"), (FinetuneOptions, "--epochs", "500"),
    (PretrainOptions, "--weight-decay", "0.05"), (FinetuneOptions, "--roi", "96 96 96"),
    (FinetuneOptions, "--device", "auto")])
def test_help_shows_the_default_of_the_dataclass_field(cls, flag, shown):
    action = next(a for a in parser_for(cls)._actions if flag in a.option_strings)
    assert action.help.endswith(f"(default {shown})")
    assert action.default is None  # "not given": --resume keeps the run's value


def test_the_cli_help_lists_the_dataclass_defaults():
    env = {**os.environ, "PYTHONPATH": str(REPO / "MiMSegmentation")}
    text = subprocess.run([sys.executable, "-m", "mim3d", "finetune", "--help"], capture_output=True, text=True,
                          env=env, check=True).stdout
    assert "(default 500)" in " ".join(text.split()) and "(default mim-unetr)" in " ".join(text.split())


@pytest.mark.parametrize("options", [
    PretrainOptions(data=("/scans/a", "/scans/b"), out="/runs/p", method="simmim", preset="small", epochs=7,
                    blr=1.5e-4, amp=False, override={"num_layers": 2, "alignment_form": "byol"}, max_steps=3),
    FinetuneOptions(out="/runs/f", dataset="/d/dataset.json", label_map={"5": 1}, val_cases=("a", "b"), roi=(64,),
                    spacing=(1.0, 1.0, 2.5), intensity=(-100.0, 200.0), arch="unetr", lr=2e-4, amp=True),
])
def test_options_survive_the_command_line_and_config_json(options):
    parsed, resume = resolve(type(options), parser_for(type(options)).parse_args(options.to_args()))
    assert resume is None and parsed == options.completed()
    assert type(options).from_dict(json.loads(json.dumps(parsed.to_dict()))) == parsed


def test_values_are_normalised_on_construction():
    options = FinetuneOptions(roi=[64], spacing=[6.0], label_map='{"5": 1}', override=["depths=[1,1,1,1]"])
    assert (options.roi, options.spacing) == ((64, 64, 64), (6.0, 6.0, 6.0))
    assert (options.label_map, options.override) == ({"5": 1}, {"depths": [1, 1, 1, 1]})


@pytest.mark.parametrize("changes, message", [
    ({"epochs": 0}, "--epochs: 0; must be at least 1"),
    ({"workers": -1}, "--workers: -1; must be 0 or more"),
    ({"lr": float("nan")}, "--lr: NaN; must be a finite number >= 0"),
    ({"device": "tpu"}, "--device: tpu; must be one of auto, cpu, cuda"),
    ({"val_fraction": 1.0}, "--val-fraction: 1.0; must lie in [0, 1)"),
    ({"warmup_epochs": 600.0}, "--warmup-epochs: 600.0; must lie between 0 and --epochs 500"),
    ({"intensity": (10.0, -10.0)}, "--intensity: 10 -10; LOW must be below HIGH (HU)"),
])
def test_each_field_checks_its_value_and_names_the_option(changes, message):
    with pytest.raises(BadInputError, match=re.escape(message)):
        FinetuneOptions(**changes).validate()


def test_resume_rebuilds_the_options_from_config_json_and_refuses_a_change(tmp_path):
    from mim3d.runs import RunDir, write_json_atomic

    saved = FinetuneOptions(out=str(tmp_path), segmentations="/segs", roi=(64,), epochs=9).completed()
    run = RunDir(tmp_path)
    run.checkpoints.mkdir()
    run.checkpoint("last").write_bytes(b"")
    write_json_atomic(run.config, {"command": "finetune", "options": saved.to_dict()})
    write_json_atomic(run.status, {"state": "stopped"})
    parser = parser_for(FinetuneOptions)
    opts, resume = resolve(FinetuneOptions, parser.parse_args(["--resume", str(tmp_path), "--workers", "0"]))
    assert resume.path == tmp_path and opts == FinetuneOptions(**{**saved.to_dict(), "workers": 0})
    with pytest.raises(BadInputError, match=re.escape("--roi [96, 96, 96] (the run has [64, 64, 64])")):
        resolve(FinetuneOptions, parser.parse_args(["--resume", str(tmp_path), "--roi", "96"]))


def test_run_options_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None\n"
            "import mim3d.run_options, mim3d.runs, mim3d.presets; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "MiMSegmentation")})
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr


VOCABULARY = [r'\("mim", "mae", "simmim"\)', r'\("mim-unetr", "unetr"\)', r'\("auto", "cpu", "cuda"\)',
              r'\("small", "base"\)', r'\{"mim": "mim-unetr"']


@pytest.mark.parametrize("pattern", VOCABULARY)
def test_each_vocabulary_tuple_is_defined_once_in_presets(pattern):
    sources = [p for folder in ("MiMSegmentation", "MiMPretrain") for p in (REPO / folder).rglob("*.py")]
    found = [p.relative_to(REPO).as_posix() for p in sources if re.search(pattern, p.read_text(encoding="utf-8"))]
    assert found == ["MiMSegmentation/mim3d/presets.py"]


def test_every_method_and_architecture_has_every_preset():
    assert set(presets.PRESETS) == {*presets.PRETRAINING_METHODS, *presets.SEGMENTATION_ARCHS}
    assert all(set(named) == set(presets.PRESET_NAMES) for named in presets.PRESETS.values())
    assert set(presets.ENCODER_ARCH) == set(presets.PRETRAINING_METHODS)
    assert set(presets.ENCODER_ARCH.values()) <= set(presets.SEGMENTATION_ARCHS)
