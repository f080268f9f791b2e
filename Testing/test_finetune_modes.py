"""`mim3d finetune --encoder full|frozen|gradual` and `--pretrained` model packages: real `python -m mim3d finetune`
runs on the example CT (the cut-down networks and 6 mm grid of test_finetune.py), real checkpoints and packages.

The pre-trained encoder is a tiny MiM pre-training model saved as a mim3d checkpoint (its weights at initialisation:
what matters here is where each tensor goes, not what it learned).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from test_finetune import (
    MIM_TINY,
    NET,
    bad_input,
    blob,
    entries,
    finetune_args,
    mim3d,
    overrides,
    protocol_events,
    read_status,
    run,
    stop_after_first_step,
    synthetic_args,
    synthetic_cases,
    train_losses,
    write_cases,
)

from mim3d.labels import LabelTable
from mim3d.models import build_pretrainer, build_segmenter
from mim3d.models.checkpoints import save_checkpoint
from mim3d.package import ModelInfo, load_package_start, save_package
from mim3d.presets import config_to_dict, resolve
from mim3d.training.distributed import derive_seed
from mim3d.training.encoder_modes import ENCODER_LR_FACTOR, EncoderMode

ROI = (64, 64, 32)
TINY = {"embed_dims": [6, 12, 24, 48], "depths": [1, 1, 1, 1], "num_heads": 4}
STAGES = {"transformer": ("backbone.patch_embed4.", "backbone.patch_embed5.", "backbone.pos_embed",
                          "backbone.blocks4."),
          "conv stage 3": ("backbone.patch_embed3.", "backbone.blocks3."),
          "conv stages 1-2": ("backbone.patch_embed1.", "backbone.blocks1.", "backbone.patch_embed2.",
                              "backbone.blocks2.")}


def stage_of(key: str) -> str | None:
    return next((stage for stage, prefixes in STAGES.items() if key.startswith(prefixes)), None)


def tiny_segmenter(num_classes: int = 3, in_channels: int = 1, **changes) -> torch.nn.Module:
    """The network of `finetune_args(net="tiny")`, initialised as `mim3d finetune --seed 0` initialises it."""
    torch.manual_seed(derive_seed(0, "init"))
    return build_segmenter("mim-unetr", num_classes, "small", ROI, in_channels, **{**TINY, **changes})


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mim3d-home")


@pytest.fixture(scope="module")
def encoder_checkpoint(tmp_path_factory) -> Path:
    """A tiny MiM pre-training model's weights as a mim3d "mim" checkpoint."""
    keys = dict(item.split("=") for item in MIM_TINY)
    model = build_pretrainer("mim", "small", **{k: json.loads(v) for k, v in keys.items()})
    path = tmp_path_factory.mktemp("encoder") / "mim.pt"
    return save_checkpoint(path, method="mim", config=config_to_dict(model.config), model_state=model.state_dict())


@pytest.fixture(scope="module")
def three_cases(tmp_path_factory, example_ct_sm_path, example_seg_path) -> Path:
    return write_cases(tmp_path_factory.mktemp("three"), example_ct_sm_path, example_seg_path, names=("a", "b", "c"))


def mode_args(data: Path, out: Path, mode: str, checkpoint: Path, *extra: str) -> list[str]:
    """Two training cases (2 steps per epoch), 2 epochs: 4 scheduled steps; gradual unfreezes at steps 1, 2, 3."""
    return finetune_args(data, out, "--val-cases", "c", "--val-every", "1", "--encoder", mode, "--pretrained",
                         str(checkpoint), *extra, epochs=2)


def encoder_keys(state: dict) -> list[str]:
    return [k for k in state if stage_of(k)]


# ---- what each mode trains ------------------------------------------------------------------------------------------

def test_frozen_encoder_keeps_no_activations_and_is_in_eval_mode():
    model = tiny_segmenter()
    mode = EncoderMode.of("frozen", model, "mim-unetr", scheduled_steps=10)
    mode.apply(model, 0)
    seen = {}
    model.backbone.blocks4[-1].register_forward_hook(lambda m, i, out: seen.update(encoder=out))
    logits = model(torch.rand(1, 1, *ROI))
    assert not seen["encoder"].requires_grad and seen["encoder"].grad_fn is None  # nothing kept for its backward
    assert logits.requires_grad
    assert not model.backbone.blocks1.training and not model.backbone.blocks4.training
    assert model.backbone.fpn.training and model.decoder1.training  # fpn is the fine-tuning-only fifth level
    names = {id(p) for g in mode.param_groups(model, 1e-5) for p in g["params"]}
    encoder = mode.encoder_names(model)
    assert encoder and not any(id(dict(model.named_parameters())[n]) in names for n in encoder)
    assert all(stage_of(n) for n in encoder)


def test_gradual_unfreezes_deepest_stage_first_at_a_quarter_half_and_three_quarters_of_the_steps():
    model = tiny_segmenter()
    mode = EncoderMode.of("gradual", model, "mim-unetr", scheduled_steps=100)
    assert mode.unfreeze_steps == [25, 50, 75]
    params = dict(model.named_parameters())
    for step, trained in [(0, set()), (24, set()), (25, {"transformer"}), (49, {"transformer"}),
                          (50, {"transformer", "conv stage 3"}), (75, set(STAGES)), (100, set(STAGES))]:
        mode.apply(model, step)
        for name, param in params.items():
            stage = stage_of(name)
            assert param.requires_grad == (stage is None or stage in trained), (step, name)
        assert model.backbone.blocks4.training == ("transformer" in trained)
    groups = mode.param_groups(model, 1e-5)
    scales = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert len(scales) == len(params)  # every parameter is in the optimiser from the start
    assert all(scales[id(p)] == (ENCODER_LR_FACTOR if stage_of(n) else 1.0) for n, p in params.items())


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory, three_cases, home, encoder_checkpoint) -> Path:
    out = tmp_path_factory.mktemp("frozen") / "run"
    done = run(mim3d("finetune", *mode_args(three_cases, out, "frozen", encoder_checkpoint)), home)
    assert done.returncode == 0
    return out


def test_frozen_run_changes_no_encoder_weight_and_gives_it_no_optimizer_state(frozen_run, encoder_checkpoint):
    source = torch.load(encoder_checkpoint, weights_only=True)["model"]
    payload = torch.load(frozen_run / "checkpoints" / "last.pt", weights_only=True)
    tuned, optimizer = payload["model"], payload["optimizer"]
    keys = encoder_keys(tuned)
    loaded = [k for k in keys if k.removeprefix("backbone.") in source and k != "backbone.pos_embed"]
    assert loaded and all(torch.equal(tuned[k], source[k.removeprefix("backbone.")]) for k in loaded)
    start = tiny_segmenter(num_classes=3).state_dict()  # gamma and relative position bias: as built (deterministic)
    assert all(torch.equal(tuned[k], start[k]) for k in keys if "gamma_" in k or "relative_position" in k)
    decoder_changed = [k for k in tuned if k.startswith("decoder") and not torch.equal(tuned[k], start[k])]
    assert decoder_changed  # the decoder did train
    config = json.loads((frozen_run / "config.json").read_text())
    counts = config["encoder"]["parameters"]
    trainable = counts["total"] - counts["encoder"]
    assert config["options"]["encoder"] == config["encoder"]["mode"] == "frozen"
    in_optimizer = sum(len(g["params"]) for g in optimizer["param_groups"])
    model = tiny_segmenter()
    encoder_tensors = [n for n, _ in model.named_parameters() if stage_of(n)]
    assert in_optimizer == len(list(model.parameters())) - len(encoder_tensors)
    assert len(optimizer["state"]) == in_optimizer  # every optimised parameter has state: none of the encoder
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if not stage_of(n))
    assert "encoder frozen: " in (frozen_run / "log.txt").read_text()
    provenance = json.loads((frozen_run / "model" / "model.json").read_text())["provenance"]
    assert provenance["encoder"]["mode"] == "frozen" and provenance["encoder"]["parameters"] == counts


def test_gradual_run_trains_each_stage_only_from_its_step(tmp_path, three_cases, home, encoder_checkpoint):
    out = tmp_path / "run"
    assert run(mim3d("finetune", *mode_args(three_cases, out, "gradual", encoder_checkpoint,
                                            "--checkpoint-every", "1")), home).returncode == 0
    source = torch.load(encoder_checkpoint, weights_only=True)["model"]
    start = tiny_segmenter().state_dict()
    first = {k: start[k] if k.removeprefix("backbone.") not in source or k == "backbone.pos_embed" else
             source[k.removeprefix("backbone.")] for k in encoder_keys(start)}
    after2 = torch.load(out / "checkpoints" / "epoch-1.pt", weights_only=True)["model"]  # steps 0 and 1 done
    after4 = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]

    def changed(state: dict, stage: str) -> bool:
        return any(not torch.equal(state[k], v) for k, v in first.items() if stage_of(k) == stage
                   and k != "backbone.pos_embed")  # pos_embed: interpolated on loading, compared below

    assert changed(after2, "transformer") and not changed(after2, "conv stage 3")
    assert not changed(after2, "conv stages 1-2")
    assert changed(after4, "conv stage 3") and changed(after4, "conv stages 1-2")
    config = json.loads((out / "config.json").read_text())["encoder"]
    assert [s["unfrozen_at_step"] for s in config["stages"]] == [1, 2, 3] and config["lr_factor"] == ENCODER_LR_FACTOR


# ---- resume in each mode --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["frozen", "gradual"])
def test_stopped_run_resumes_to_the_losses_of_an_uninterrupted_run(mode, tmp_path, three_cases, home,
                                                                    encoder_checkpoint):
    reference = tmp_path / "reference"
    assert run(mim3d("finetune", *mode_args(three_cases, reference, mode, encoder_checkpoint)), home).returncode == 0
    out = tmp_path / "run"
    stop_after_first_step(mode_args(three_cases, out, mode, encoder_checkpoint), out, home)
    assert read_status(out)["state"] == "stopped" and 1 <= read_status(out)["step"] < 4
    resumed = run(mim3d("finetune", "--resume", str(out)), home)
    assert resumed.returncode == 0 and protocol_events(resumed.stdout)[-1]["state"] == "finished"
    assert list(train_losses(out)) == [1, 2, 3, 4]
    assert train_losses(out) == train_losses(reference)  # bitwise: the same floats on the CPU
    final = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    expected = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert [v["mean_dice"] for v in entries(out, "validation")] == [v["mean_dice"]
                                                                     for v in entries(reference, "validation")]


def test_resume_refuses_another_encoder_mode(frozen_run, capsys):
    message = bad_input(["--resume", str(frozen_run), "--encoder", "full"], capsys)
    assert "--encoder full (the run has frozen)" in message


# ---- starting from a model package ----------------------------------------------------------------------------------

UNETR_TINY = {"hidden_size": 48, "mlp_dim": 96, "num_heads": 4, "feature_size": 8}


def make_package(folder: Path, labels: list[dict], arch: str = "mim-unetr", in_channels: int = 1,
                 **changes) -> tuple[Path, dict]:
    """A package of a fresh tiny network (its own seed), with `labels`; returns it and its weights."""
    table = LabelTable.from_dict({"labels": labels})
    config = {**(TINY if arch == "mim-unetr" else UNETR_TINY), **changes}
    torch.manual_seed(123)
    model = build_segmenter(arch, table.num_classes, "small", ROI, in_channels, **config)
    info = ModelInfo(name="start", version="1.0.0", architecture={
        "arch": arch, "preset": "small", "config": config_to_dict(resolve(arch, "small", **config)),
        "num_classes": table.num_classes, "in_channels": in_channels}, preprocessing={},
        inference={"roi_size": list(ROI)}, labels=table, weights_sha256="")
    save_package(folder, model, info)
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


PACKAGE_LABELS = [{"value": 1, "name": "Spleen"}, {"value": 2, "name": "kidney"}, {"value": 3, "name": "liver"}]


def test_package_start_keeps_the_rows_of_labels_with_the_same_name_and_initialises_the_rest(tmp_path):
    package, weights = make_package(tmp_path / "pkg", PACKAGE_LABELS)
    archive = tmp_path / "pkg.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in package.iterdir():
            zf.write(file, f"pkg/{file.name}")
    table = LabelTable.from_dict({"labels": [{"value": 1, "name": "liver"}, {"value": 2, "name": "spleen"},
                                             {"value": 3, "name": "pancreas"}, {"value": 4, "name": "aorta"}]})
    for source in (package, archive):
        model = tiny_segmenter(table.num_classes)
        fresh = {k: v.clone() for k, v in model.state_dict().items()}
        loaded = load_package_start(model, source, "mim-unetr", 1, table)
        state = model.state_dict()
        assert all(torch.equal(state[k], weights[k]) for k in weights if not k.startswith("out."))
        for key in ("out.conv.conv.weight", "out.conv.conv.bias"):
            assert state[key].shape[0] == 5
            assert torch.equal(state[key][0], weights[key][0])  # background
            assert torch.equal(state[key][1], weights[key][3])  # liver: the package's value 3
            assert torch.equal(state[key][2], weights[key][1])  # spleen (its "Spleen")
            assert torch.equal(state[key][3:], fresh[key][3:])  # pancreas, aorta: as initialised
        assert loaded["kept_labels"] == ["liver", "spleen"] and loaded["new_labels"] == ["pancreas", "aorta"]
        assert loaded["checkpoint"] == str(source) and loaded["source"] == "mim3d-package"


def test_run_from_a_zipped_package_records_it_in_config_and_provenance(tmp_path, three_cases, home):
    package, _ = make_package(tmp_path / "pkg", PACKAGE_LABELS)
    archive = Path(str(package) + ".zip")
    with zipfile.ZipFile(archive, "w") as zf:
        for file in package.iterdir():
            zf.write(file, file.name)
    out = tmp_path / "run"
    done = run(mim3d("finetune", *finetune_args(three_cases, out, "--val-cases", "c", "--pretrained", str(archive),
                                                "--encoder", "frozen", "--max-steps", "1", epochs=1)), home)
    assert done.returncode == 0
    pretrained = json.loads((out / "config.json").read_text())["pretrained"]
    assert pretrained["from"] == str(archive) and pretrained["kept_labels"] == ["liver", "spleen"]
    model_json = json.loads((out / "model" / "model.json").read_text())
    assert model_json["provenance"]["pretrained_from"] == str(archive)
    assert "from the model package" in model_json["description"]


@pytest.mark.parametrize("arch, changes, expected", [
    ("unetr", {}, "a unetr model package, but this run fine-tunes mim-unetr; give --arch unetr"),
    ("mim-unetr", {"in_channels": 2}, "the package's network takes 2 input channel(s), this run 1"),
    ("mim-unetr", {"embed_dims": [12, 24, 48, 96]}, "differs from this run's network"),
])
def test_package_of_another_architecture_or_channel_count_is_refused_naming_it(arch, changes, expected, tmp_path,
                                                                              capsys, monkeypatch):
    monkeypatch.setenv("MIM3D_HOME", str(tmp_path / "home"))
    data = synthetic_cases(tmp_path, {"one": blob()})
    package, _ = make_package(tmp_path / "pkg", PACKAGE_LABELS, arch, **changes)
    message = bad_input(synthetic_args(data, tmp_path / "run", *overrides(NET["tiny"]), "--roi", "64", "64", "32",
                                       "--pretrained", str(package)), capsys)
    assert message.startswith(f"--pretrained {package}: ") and expected in message, message
    assert not (tmp_path / "run").exists()


def test_frozen_or_gradual_without_pretrained_weights_is_refused(tmp_path, capsys):
    message = bad_input(["--images", str(tmp_path), "--labels", str(tmp_path), "--label-table", str(tmp_path / "t"),
                         "--out", str(tmp_path / "run"), "--encoder", "gradual"], capsys)
    assert "--encoder gradual needs --pretrained" in message
